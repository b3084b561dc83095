"""The ledger's vocabulary: every entry kind and every actor, in one place.

Ledgers are JSON on disk (:mod:`common.ledger`), so kinds and actors stay plain strings there:
:class:`Kind` and :class:`Role` are ``StrEnum`` members that compare equal to, and serialise
as, exactly the strings fedpriv has always written (``"run_start"``, ``"client:3"``), so every
ledger written before this module existed still verifies and replays. Code outside this module
names kinds and actors only through it, never as string literals.

Actors are ``server`` (the run's server), ``client:<id>`` (a client as the run ledger records
it), ``node`` (a node in its own ledger), ``node:<id>`` (a node as the server saw it, in a
refusal), ``ledger`` (the writer's own crash recovery) and ``operator:<name>`` (the operator log).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What a ledger entry records (its ``kind``)."""

    RUN_START = "run_start"  # a run begins: its configuration, delta and budgets
    RUN_RESUME = "run_resume"  # the same run continues from its checkpoint in a new process
    RECORD_LEVEL = "record_level"  # one client's (or node's) DP-SGD spend of a round
    RECORD_LEVEL_CARRIED = "record_level_carried"  # a client's spending before this run
    USER_LEVEL = "user_level"  # one round of user-level DP (DP-FedAvg) by the server
    REFUSAL = "refusal"  # a node refused a round (in the run ledger)
    ROUND_FAILED = "round_failed"
    BUDGET_STOP = "budget_stop"  # the run stopped before a round that would pass the user budget
    RUN_END = "run_end"
    LEDGER_RECOVERY = "ledger_recovery"  # what crash recovery cut off the end of a ledger
    KEY_ROTATION = "key_rotation"  # the sealing key was rotated and the run's sealed files sealed again
    # A node's own ledger: refusals it made (besides its record_level spends).
    SECAGG_REFUSAL = "secagg_refusal"
    POLICY_REFUSAL = "policy_refusal"
    APP_REFUSAL = "app_refusal"
    # The operator log (server state): one operator action.
    OPERATOR_ACTION = "operator_action"


RUN_KINDS = (Kind.RUN_START, Kind.RUN_RESUME)  # entries that put a configuration and budgets in force
RECORD_KINDS = (Kind.RECORD_LEVEL, Kind.RECORD_LEVEL_CARRIED)
REFUSAL_KINDS = (Kind.REFUSAL, Kind.SECAGG_REFUSAL, Kind.POLICY_REFUSAL, Kind.APP_REFUSAL)


def kind_of(entry: dict[str, Any]) -> Kind | None:
    """An entry's kind, or None where it names none this fedpriv knows."""
    try:
        return Kind(entry.get("kind"))
    except ValueError:
        return None


class Role(StrEnum):
    """Who wrote or is charged by an entry: an actor's role (before any ``:<id>``)."""

    SERVER = "server"
    CLIENT = "client"
    NODE = "node"
    LEDGER = "ledger"
    OPERATOR = "operator"


SERVER = Role.SERVER.value  # the actor of the server's own entries
NODE = Role.NODE.value  # the actor of a node's entries in its own ledger
LEDGER_ACTOR = Role.LEDGER.value  # the actor of a crash-recovery entry
UNKNOWN_OPERATOR = "unknown"


@dataclass(frozen=True)
class Actor:
    role: Role | None  # None: not an actor this fedpriv knows
    id: str | None  # the client id, node id or operator name; None for server, node, ledger
    raw: str


def _actor(role: Role, identity: Any) -> str:
    return f"{role.value}:{identity}"


def client_actor(client_id: Any) -> str:
    """``client:<id>``: a client as the run ledger records it."""
    return _actor(Role.CLIENT, client_id)


def node_actor(node: Any = None) -> str:
    """``node`` (a node in its own ledger), or ``node:<id>`` (a node the server names)."""
    return NODE if node is None else _actor(Role.NODE, node)


def operator_actor(name: str | None) -> str:
    return _actor(Role.OPERATOR, name or UNKNOWN_OPERATOR)


def parse_actor(raw: Any) -> Actor:
    """Split an actor string into its role and id (``client:3`` -> CLIENT, ``"3"``)."""
    text = str(raw)
    head, sep, rest = text.partition(":")
    try:
        role = Role(head)
    except ValueError:
        return Actor(None, None, text)
    return Actor(role, rest if sep else None, text)


def client_id_of(actor: Any) -> str | None:
    """The client id of a ``client:<id>`` actor, else None."""
    parsed = parse_actor(actor)
    return parsed.id if parsed.role is Role.CLIENT else None
