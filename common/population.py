"""User-level spending composed across the runs of one server state.

Record-level spending composes across runs on each node, through the node's own ledger
(:mod:`clients.budget`). User-level spending (DP-FedAvg, the server's ``user_level`` entries)
protects the users of a population, and the same population trained on by several runs loses
privacy in every one of them. So a run's user-level epsilon is composed with the user-level
spending of every earlier run of the same server state, and ``privacy.user_budget`` is enforced
on the composition.

**Assumption: a population is identified by its server state directory.** Every run witnessed
in one state (``fedpriv server start --state STATE``: ``STATE/ledger-witness``; simulations:
``$FEDPRIV_HOME/ledger-witness``, or ``$FEDPRIV_LEDGER_WITNESS``; see :mod:`common.witness`)
is taken to train on the same users, whatever its configuration says; runs of another state are
taken to train on other users. Keep unrelated populations in separate state directories, and
the same population in one.

The earlier runs are found through the server's witness records (``runs/<run id>.json``, kept
outside the run directories): each names its run directory, its signed head and the key that
signed it. An earlier run's ledger is read only when it verifies with that key, its head is
signed by it, and it extends the witnessed head (no rollback); its user-level events are then
read with :func:`common.replay.replay`. A run whose ledger cannot be found or verified is
*uncomposed*: a run that enforces a user-level budget refuses to start, as its spending cannot
be counted (restore the ledger, or remove its witness record to declare it another population).

The composition a run used is written into its ``run_start`` (and each ``run_resume``): per
earlier run, its run id, entry count and head hash, so an audit can read the same prefix of the
same ledgers again (:func:`recheck`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import verify_head_signature, verify_ledger
from fedpriv.common.replay import replay
from fedpriv.common.witness import RUNS, prefix_problem, run_witness_path
from fedpriv.common.lazy import lazy_import

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

COMPOSED = "composed_runs"  # run_start / run_resume parameter: the earlier runs composed
UNCOMPOSED = "uncomposed_runs"  # ... and those that could not be read


@dataclass(frozen=True)
class ComposedRun:
    """The user-level spending of one earlier run, read from a verified prefix of its ledger."""

    run_id: str
    entries: int
    head_hash: str
    events: tuple[dp_accounting.DpEvent, ...]
    delta_additions: tuple[float, ...]

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "entries": self.entries, "head_hash": self.head_hash,
                "user_level_rounds": len(self.events)}


@dataclass
class Composition:
    runs: list[ComposedRun] = field(default_factory=list)
    uncomposed: list[dict[str, str]] = field(default_factory=list)  # {"run_id", "reason"}

    @property
    def events(self) -> list[dp_accounting.DpEvent]:
        return [event for run in self.runs for event in run.events]

    @property
    def delta_additions(self) -> list[float]:
        return [addition for run in self.runs for addition in run.delta_additions]

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {COMPOSED: [run.record() for run in self.runs]}
        if self.uncomposed:
            out[UNCOMPOSED] = list(self.uncomposed)
        return out


def _read(path: Path) -> tuple[dict[str, Any], Ed25519PublicKey]:
    try:
        record = json.loads(path.read_text())
        head = dict(record["head"])
        key = serialization.load_pem_public_key(record["public_key"].encode())
        run_dir = record["run_dir"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise FedprivError(f"its witness record {path} is unreadable") from None
    if not isinstance(key, Ed25519PublicKey) or not isinstance(run_dir, str):
        raise FedprivError(f"its witness record {path} is malformed")
    if not verify_head_signature(head, key):
        raise FedprivError(f"its witness record {path} holds a head not signed by its key")
    return {"head": head, "run_dir": Path(run_dir)}, key


def _user_level(run_id: str, path: Path, upto: int | None = None,
                head_hash: str | None = None) -> ComposedRun:
    """The user-level spending of the run witnessed at ``path``: its whole verified ledger, or
    (``upto``, ``head_hash``) exactly that prefix of it."""
    record, key = _read(path)
    run_dir = record["run_dir"]
    report = verify_ledger(run_dir, key, crash_tail=True)
    if not report.ok:
        raise FedprivError(f"its ledger in {run_dir} does not verify: {report.failures[0]}")
    entries = report.entries
    head = record["head"]
    problem = prefix_problem(entries, head.get("entries"), head.get("head_hash"))
    if problem:
        raise FedprivError(f"its ledger in {run_dir}: {problem}")
    if upto is not None:
        problem = prefix_problem(entries, upto, head_hash)
        if problem:
            raise FedprivError(f"its ledger in {run_dir} no longer holds what was composed: {problem}")
        entries = entries[:upto]
    state = replay(entries)
    if state.run_id != run_id:
        raise FedprivError(f"its ledger in {run_dir} is of run {state.run_id}")
    if state.unreadable:
        raise FedprivError(f"its ledger in {run_dir}: entry {state.unreadable[0].seq}'s DpEvent cannot be read")
    spends = state.user_level()
    return ComposedRun(run_id, len(entries), entries[-1]["hash"] if entries else "",
                       tuple(s.event for s in spends), tuple(s.delta_addition for s in spends))


def compose_state(root: Path, run_id: str) -> Composition:
    """The user-level spending of every run witnessed in the state ``root`` (a witness dir)
    other than ``run_id``; runs that spent nothing user-level are left out."""
    composition = Composition()
    folder = root / RUNS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        other = path.stem
        if other == run_id:
            continue
        try:
            run = _user_level(other, path)
        except FedprivError as exc:
            composition.uncomposed.append({"run_id": other, "reason": str(exc)})
            continue
        if run.events:
            composition.runs.append(run)
    return composition


def recheck(root: Path, recorded: Any) -> tuple[Composition, list[str]]:
    """Read again what a run_start recorded as composed (``recorded``: its ``composed_runs``):
    the same prefix of each earlier ledger, found through the witness records in ``root``.
    Returns the composition and why any of it could not be read again."""
    composition, failures = Composition(), []
    for item in recorded if isinstance(recorded, list) else []:
        try:
            run_id, upto, head_hash = str(item["run_id"]), int(item["entries"]), str(item["head_hash"])
            run = _user_level(run_id, run_witness_path(root, run_id), upto, head_hash)
        except (KeyError, TypeError, ValueError):
            failures.append(f"the run_start names a composed run it does not describe: {item!r}")
            continue
        except FedprivError as exc:
            failures.append(f"composed earlier run {item.get('run_id')}: {exc}")
            continue
        if len(run.events) != item.get("user_level_rounds"):
            failures.append(f"composed earlier run {run_id}: its ledger holds {len(run.events)} user-level "
                            f"round(s) in the composed prefix, the run_start recorded {item.get('user_level_rounds')}")
        composition.runs.append(run)
    return composition, failures
