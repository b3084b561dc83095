"""A fedpriv node's checks on the server during Flower's SecAgg+ protocol.

Flower's ``secaggplus_mod`` trusts the server to follow the protocol. A server that deviates can
ask a node for a neighbour's self-mask share *and* its key share (by listing it as both surviving
and dropped), or substitute a neighbour's public keys with its own; either exposes that
neighbour's individual update. :class:`SecAggGuard` runs in front of ``secaggplus_mod`` (in
:mod:`clients.mods`) and, before anything leaves the node, refuses a round when the server:

- **setup**: does not announce fedpriv's mask generator (:mod:`common.secagg_masks`), asks for
  fewer shares than :data:`common.config.SECAGG_MIN_SHARES` or a threshold that is not a strict
  majority of them
  (with a majority, two disjoint sets of a node's neighbours cannot both reach the threshold, so
  no node's two secrets can both be rebuilt), a modulus that is not a power of two, or sends no
  roster that this node's trust anchor signed, or one without this node's key;
- **share keys**: names more neighbours than shares (or fewer than the threshold), or relays a
  public key that is not signed, for this run, round and node id, by a key on the roster
  (:mod:`common.roster`), or the same signer twice;
- **collect**: forwards key shares from nodes that are not this node's neighbours;
- **unmask**: lists a node as both surviving and dropped, names a node that was never this node's
  neighbour, lists this node as dropped, leaves fewer survivors than the threshold, or asks a
  second time in one round.

A refusal is a dropout (Flower's error reply, code :data:`common.protocol.SECAGG_REFUSED_CODE`)
with its reason, recorded in the node's own signed ledger before the reply leaves. The node signs
its own public keys the same way (its advertisement replaces the second key; neighbours' guards
strip it before Flower's code sees it).

State lives in the node's Flower context beside ``secaggplus_mod``'s own, under
:data:`GUARD_RECORD`, and starts afresh at each setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpriv.common import roster as rosters
from fedpriv.common.config import secagg_floor_problem
from fedpriv.common.errors import FedprivError
from fedpriv.common.secagg_masks import GENERATOR, GENERATOR_KEY

GUARD_RECORD = "fedpriv_secagg_guard"
REFUSED = "refused"  # the guard's stage after a refused setup: the round goes no further here


class SecAggRefusal(FedprivError):
    """The server deviated from the protocol (or asked for less than this node's floor)."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a node signs its SecAgg+ keys with, and what it trusts a roster from: a key file, or
    (``simulated`` names the virtual node) the simulation's node secret its key derives from."""

    key_path: Path
    anchor_path: Path
    simulated: str | None = None

    def key(self) -> rosters.PrivateKey:
        if self.simulated is not None:
            return _cached(rosters.simulated_node_key, self.key_path, self.simulated)
        return _cached(rosters.load_node_private_key, self.key_path)

    def anchor(self) -> rosters.PublicKey:
        return _cached(rosters.load_trust_anchor, self.anchor_path)


_KEYS: dict[tuple[Any, ...], tuple[tuple[int, int], Any]] = {}  # (loader, path, args) -> (stamp, key)


def _cached(load: Callable[..., Any], path: Path, *args: Any) -> Any:
    """``load(path, *args)``, run again only when the file changes (size or modification time):
    a node answers four SecAgg+ messages a round with the same keys."""
    try:
        info = path.stat()
    except OSError:
        return load(path, *args)  # (which names the problem)
    stamp = (info.st_mtime_ns, info.st_size)
    hit = _KEYS.get((load, path, *args))
    if hit is None or hit[0] != stamp:
        hit = (stamp, load(path, *args))
        _KEYS[(load, path, *args)] = hit
    return hit[1]


def _round_context(msg: Message) -> str:
    return f"flower-run:{msg.metadata.run_id}/round:{msg.metadata.group_id}"


class SecAggGuard:
    """Checks one SecAgg+ message from the server, and signs this node's keys (see module doc)."""

    def __init__(self, context: Context, identity: Callable[[], NodeIdentity | None],
                 min_shares: int = 0) -> None:
        self.context = context
        self.identity = identity
        self.min_shares = min_shares  # a node policy's minimum, above fedpriv's floor (0: the floor)
        self.state: dict[str, Any] = dict(context.state.config_records.get(GUARD_RECORD, ConfigRecord({})))

    def save(self) -> None:
        self.context.state.config_records[GUARD_RECORD] = ConfigRecord(self.state)

    # ---- before Flower's mod sees the message ----------------------------------------------
    def check(self, msg: Message) -> None:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        if stage == Stage.SETUP:
            self._check_setup(msg, configs)
            return
        if self.state.get("round") != _round_context(msg):
            raise SecAggRefusal(f"a {stage} request without this round's setup")
        if stage == Stage.SHARE_KEYS:
            self._check_share_keys(msg, configs)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            self._check_collect(configs)
        elif stage == Stage.UNMASK:
            self._check_unmask(configs)
        else:
            raise SecAggRefusal(f"unknown SecAgg+ stage {stage!r}")

    def _check_setup(self, msg: Message, configs: ConfigRecord) -> None:
        self.state = {"round": _round_context(msg), "stage": REFUSED}  # until every check passes
        generator = configs.get(GENERATOR_KEY)
        if generator != GENERATOR:
            raise SecAggRefusal(
                f"the server's masks would come from {generator or 'the stock Flower generator'!s}, "
                f"not {GENERATOR} (Flower 1.42's generator is brute-forceable)")
        shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
        modulus = configs.get(Key.MOD_RANGE)
        if not isinstance(shares, int) or not isinstance(threshold, int) or not isinstance(modulus, int):
            raise SecAggRefusal("the setup lacks integer share, threshold and modulus settings")
        floor = secagg_floor_problem(shares, threshold)
        if floor:
            raise SecAggRefusal(f"{floor} (this node's floor)")
        if shares < self.min_shares:
            raise SecAggRefusal(f"{shares} shares is below this node's policy minimum of {self.min_shares}")
        if modulus < 2 or modulus & (modulus - 1):
            raise SecAggRefusal(f"the masking modulus {modulus} is not a power of two")
        identity = self.identity()
        if identity is None:
            raise SecAggRefusal("this node has no authentication key to sign its SecAgg+ keys with")
        blob = configs.get(rosters.ROSTER_KEY)
        if not isinstance(blob, bytes):
            raise SecAggRefusal("the server sent no signed node roster")
        try:
            roster = rosters.open_roster(blob, identity.anchor())
            own = rosters.public_key_text(identity.key().public_key())
        except rosters.RosterError as exc:
            raise SecAggRefusal(str(exc)) from None
        if own not in roster:
            raise SecAggRefusal("this node's own key is not on the roster the server sent")
        self.state.update({"stage": Stage.SETUP, "shares": shares, "threshold": threshold,
                           "sample": int(configs.get(Key.SAMPLE_NUMBER, shares)),
                           "roster": "\n".join(sorted(roster.nodes)), "node": msg.metadata.dst_node_id})

    def _check_share_keys(self, msg: Message, configs: ConfigRecord) -> None:
        if self.state.get("stage") != Stage.SETUP:
            raise SecAggRefusal("a share-keys request out of order (or after a refused setup)")
        entries = {key: value for key, value in configs.items() if key != Key.STAGE}
        expected = min(int(self.state["shares"]), int(self.state["sample"]))
        if len(entries) > expected:
            raise SecAggRefusal(f"the server named {len(entries)} neighbours for {expected} shares")
        if len(entries) < int(self.state["threshold"]):
            raise SecAggRefusal(f"the server named {len(entries)} neighbours, fewer than the threshold "
                                f"{self.state['threshold']}")
        roster = rosters.Roster(frozenset(str(self.state["roster"]).split("\n")), "", "")
        context, signers = _round_context(msg), set()
        own = str(self.state["node"])
        if own not in entries:
            raise SecAggRefusal("the server left this node out of its own neighbourhood")
        for nid, value in entries.items():
            if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, bytes) for v in value):
                raise SecAggRefusal(f"node {nid}'s public keys are malformed")
            try:
                node_id = int(nid)
                advert = rosters.open_advertisement(value[1], roster, context, node_id, value[0])
            except ValueError:
                raise SecAggRefusal(f"neighbour id {nid!r} is not a node id") from None
            except rosters.RosterError as exc:
                raise SecAggRefusal(str(exc)) from None
            if advert.signer in signers:
                raise SecAggRefusal("one node key signs two neighbours' keys")
            signers.add(advert.signer)
            if nid == own and (value[0] != self.state.get("pk1") or value[1] != self.state.get("advert")):
                raise SecAggRefusal("the server relayed keys for this node that it did not advertise")
            configs[nid] = [value[0], advert.pk2]  # Flower's code gets the plain key
        self.state.update({"stage": Stage.SHARE_KEYS, "neighbours": sorted(int(n) for n in entries)})

    def _check_collect(self, configs: ConfigRecord) -> None:
        if self.state.get("stage") != Stage.SHARE_KEYS:
            raise SecAggRefusal("a masked-vector request out of order")
        neighbours = set(self.state["neighbours"])
        strangers = set(configs.get(Key.SOURCE_LIST, [])) - neighbours
        if strangers:
            raise SecAggRefusal(f"key shares forwarded from non-neighbours {sorted(strangers)}")
        self.state["stage"] = Stage.COLLECT_MASKED_VECTORS

    def _check_unmask(self, configs: ConfigRecord) -> None:
        if self.state.get("stage") == Stage.UNMASK:
            raise SecAggRefusal("a second unmask request in one round")
        if self.state.get("stage") != Stage.COLLECT_MASKED_VECTORS:
            raise SecAggRefusal("an unmask request before this node sent its masked vector")
        self.state["stage"] = Stage.UNMASK  # whatever follows, this round unmasks once
        survivors = list(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
        dropped = list(configs.get(Key.DEAD_NODE_ID_LIST, []))
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggRefusal(f"nodes {sorted(both)} are listed as both surviving and dropped")
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise SecAggRefusal("a node is listed twice")
        strangers = (set(survivors) | set(dropped)) - set(self.state["neighbours"])
        if strangers:
            raise SecAggRefusal(f"nodes {sorted(strangers)} were never this node's neighbours")
        if int(self.state["node"]) not in survivors:
            raise SecAggRefusal("this node is listed as dropped while it is asked to unmask")
        if len(survivors) < int(self.state["threshold"]):
            raise SecAggRefusal(f"{len(survivors)} survivors, fewer than the threshold {self.state['threshold']}")

    # ---- after Flower's mod answered ------------------------------------------------------
    def sign_reply(self, msg: Message, reply: Message) -> None:
        """Replace the setup reply's second public key by this node's signed advertisement."""
        if self.state.get("stage") != Stage.SETUP or reply.has_error():
            return
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        pk1, pk2 = record[Key.PUBLIC_KEY_1], record[Key.PUBLIC_KEY_2]
        identity = self.identity()
        assert identity is not None  # checked at setup
        advert = rosters.advertise(identity.key(), _round_context(msg), msg.metadata.dst_node_id, pk1, pk2)
        record[Key.PUBLIC_KEY_2] = advert
        self.state.update({"pk1": pk1, "advert": advert})
