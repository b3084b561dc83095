"""The one replay of a ledger: verified entries in, a typed :class:`LedgerState` out.

Everything that rebuilds privacy state from a ledger reads it through :func:`replay`: the
server's recorder when a run resumes (:mod:`server.privacy`), a node's budget guard
(:mod:`clients.budget`), the resume checks (:mod:`server.resume`) and the audit
(:mod:`common.audit`). It is a pure function of the entries: it reads no file, computes no
epsilon and trusts nothing about them beyond what they say; verifying the ledger (hashes,
signatures, head) is :func:`common.ledger.verify_ledger`'s job, before.

What it returns, in ledger order:

- per actor, every spend (its deserialised DpEvent, with its seq, round, kind, sampling,
  parameters and the enforcement epsilon the writer recorded beside it);
- the runs: each ``run_start`` and ``run_resume`` with its run id, delta, configuration and budgets;
- every budget ever in force and the entry (and round) that put it in force: budgets only
  tighten, so each stays in force after a later one;
- refusals, round failures, budget stops, crash recoveries and run ends;
- events that could not be deserialised (``unreadable``): each consumer decides what that means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT
from fedpriv.common.ledger import event_from_json
from fedpriv.common.ledger_schema import (
    REFUSAL_KINDS, RUN_KINDS, Kind, Role, client_id_of, kind_of, parse_actor,
)
from fedpriv.common.lazy import lazy_import

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

# Budgets a run_start or run_resume puts in force (entry parameters; 0 or absent: no limit).
BUDGETS = ("record_budget", "user_budget")


@dataclass(frozen=True)
class Spend:
    """One entry that carries a DpEvent: what an actor spent."""

    seq: int
    round: int | None
    kind: Kind | str
    actor: str
    event: dp_accounting.DpEvent
    sampling: str
    parameters: dict[str, Any]
    recorded_epsilon: float | None  # the enforcement epsilon the writer recorded (not trusted)

    @property
    def delta_addition(self) -> float:
        """The failure probability this spend charges to delta (a distributed user-level round)."""
        return float(self.parameters.get("delta_addition") or 0.0)


@dataclass
class ActorSpends:
    """Every spend of one actor, in ledger order."""

    actor: str
    spends: list[Spend] = field(default_factory=list)

    @property
    def events(self) -> list[dp_accounting.DpEvent]:
        return [s.event for s in self.spends]

    @property
    def recorded_epsilons(self) -> list[float | None]:
        return [s.recorded_epsilon for s in self.spends]

    @property
    def delta_additions(self) -> list[float]:
        return [s.delta_addition for s in self.spends]

    @property
    def sampling(self) -> str:
        """The sampling its first spend claims (what the actor is accounted under)."""
        return self.spends[0].sampling if self.spends else "poisson"

    @property
    def carried(self) -> bool:
        """Whether spending before this run is recorded for it."""
        return any(s.kind == Kind.RECORD_LEVEL_CARRIED for s in self.spends)

    def of_kind(self, *kinds: Kind) -> list[Spend]:
        return [s for s in self.spends if s.kind in kinds]


@dataclass(frozen=True)
class RunRecord:
    """A ``run_start`` or ``run_resume`` entry."""

    seq: int
    kind: Kind
    round: int | None
    run_id: str | None
    delta: Any
    config: dict[str, Any] | None
    budgets: dict[str, float | None]  # per name in BUDGETS; None: no limit
    flower_run_id: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class BudgetInForce:
    """A budget value and the entry (and round) that put it in force."""

    name: str
    value: float
    seq: int
    round: int | None


@dataclass(frozen=True)
class Note:
    """An entry without a spend: a refusal, a failed round, a budget stop, a recovery."""

    seq: int
    round: int | None
    actor: str
    kind: Kind | str
    note: str | None


@dataclass(frozen=True)
class RunEnd:
    seq: int
    epsilon: dict[str, Any]
    note: str | None


@dataclass
class LedgerState:
    entries: int = 0
    actors: dict[str, ActorSpends] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    budgets: list[BudgetInForce] = field(default_factory=list)  # every budget ever in force, in order
    refusals: list[Note] = field(default_factory=list)
    round_failures: list[Note] = field(default_factory=list)
    budget_stops: list[Note] = field(default_factory=list)
    recoveries: list[Note] = field(default_factory=list)
    run_ends: list[RunEnd] = field(default_factory=list)
    key_rotations: list[dict[str, Any]] = field(default_factory=list)  # ledger entry and key ids
    unreadable: list[Note] = field(default_factory=list)  # entries whose DpEvent cannot be read

    # ---- runs ---------------------------------------------------------------------------
    @property
    def run_start(self) -> RunRecord | None:
        return self.runs[0] if self.runs and self.runs[0].kind == Kind.RUN_START else None

    @property
    def run_id(self) -> str | None:
        start = self.run_start
        return start.run_id if start is not None else None

    @property
    def delta(self) -> Any:
        start = self.run_start
        return start.delta if start is not None else None

    @property
    def resumes(self) -> list[RunRecord]:
        return [r for r in self.runs if r.kind == Kind.RUN_RESUME]

    @property
    def config(self) -> dict[str, Any] | None:
        """The configuration the run last ran with (its latest run entry that records one)."""
        return next((r.config for r in reversed(self.runs) if r.config is not None), None)

    def _since_last_run(self, seq: int) -> bool:
        return not self.runs or seq > self.runs[-1].seq

    @property
    def run_end(self) -> RunEnd | None:
        """The end of the run as it stands: a run_end after its latest start or resume."""
        end = self.run_ends[-1] if self.run_ends else None
        return end if end is not None and self._since_last_run(end.seq) else None

    @property
    def stopped(self) -> Note | None:
        """The budget stop that ended the run as it stands (after its latest start or resume)."""
        stop = self.budget_stops[-1] if self.budget_stops else None
        return stop if stop is not None and self._since_last_run(stop.seq) else None

    # ---- budgets ------------------------------------------------------------------------
    def strictest(self, name: str) -> BudgetInForce | None:
        """The smallest value of budget ``name`` ever in force (the first entry to set it)."""
        best: BudgetInForce | None = None
        for budget in self.budgets:
            if budget.name == name and (best is None or budget.value < best.value):
                best = budget
        return best

    def budgets_in_force(self) -> dict[str, float | None]:
        """Per budget, the strictest value ever in force (None: never limited)."""
        return {name: (b.value if (b := self.strictest(name)) is not None else None) for name in BUDGETS}

    # ---- spends -------------------------------------------------------------------------
    def clients(self) -> dict[str, ActorSpends]:
        """The run ledger's clients by client id (``client:<id>`` actors)."""
        return {cid: spends for actor, spends in self.actors.items()
                if (cid := client_id_of(actor)) is not None}

    def user_level(self) -> list[Spend]:
        """The server's user-level rounds."""
        server = self.actors.get(Role.SERVER.value)
        return server.of_kind(Kind.USER_LEVEL) if server is not None else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _budgets(params: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in BUDGETS:
        value = _number(params.get(name))
        out[name] = value if value and math.isfinite(value) else None
    return out


def replay(entries: Iterable[dict[str, Any]]) -> LedgerState:
    """The state a ledger's (verified) entries record; see the module docstring."""
    state = LedgerState()
    for entry in entries:
        state.entries += 1
        seq = int(entry.get("seq", state.entries - 1))
        kind = kind_of(entry) or str(entry.get("kind"))
        actor = str(entry.get("actor"))
        round_ = entry.get("round")
        params = entry.get("parameters") or {}
        note = Note(seq, round_, actor, kind, entry.get("note"))
        if kind in RUN_KINDS:
            budgets = _budgets(params)
            run_id, flower = params.get("run_id"), params.get("flower_run_id")
            state.runs.append(RunRecord(
                seq=seq, kind=Kind(kind), round=round_, run_id=run_id if isinstance(run_id, str) else None,
                delta=params.get("delta"),
                config=dict(params["config"]) if isinstance(params.get("config"), dict) else None,
                budgets=budgets, flower_run_id=str(flower) if flower else None, parameters=dict(params)))
            state.budgets += [BudgetInForce(name, value, seq, round_)
                              for name, value in budgets.items() if value is not None]
        elif kind in REFUSAL_KINDS:
            state.refusals.append(note)
        elif kind == Kind.ROUND_FAILED:
            state.round_failures.append(note)
        elif kind == Kind.BUDGET_STOP:
            state.budget_stops.append(note)
        elif kind == Kind.LEDGER_RECOVERY:
            state.recoveries.append(note)
        elif kind == Kind.KEY_ROTATION:
            state.key_rotations.append({"ledger_entry": seq, "old_key": params.get("old_key"),
                                        "new_key": params.get("new_key"), "files": params.get("files")})
        elif kind == Kind.RUN_END:
            state.run_ends.append(RunEnd(seq, dict(entry.get("epsilon") or {}), entry.get("note")))
        elif entry.get("event") is not None:
            try:
                event = event_from_json(entry["event"])
            except (ValueError, TypeError) as exc:
                state.unreadable.append(Note(seq, round_, actor, kind, str(exc)))
                continue
            recorded = (entry.get("epsilon") or {}).get(ENFORCEMENT_ACCOUNTANT)
            state.actors.setdefault(actor, ActorSpends(actor)).spends.append(Spend(
                seq=seq, round=round_, kind=kind, actor=actor, event=event,
                sampling=entry.get("sampling") or "poisson", parameters=dict(params),
                recorded_epsilon=_number(recorded)))
    return state


def node_of(actor: str) -> str | None:
    """The node id a ``node:<id>`` actor names (a refusal in the run ledger), else None."""
    parsed = parse_actor(actor)
    return parsed.id if parsed.role is Role.NODE else None
