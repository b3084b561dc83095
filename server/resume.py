"""Resuming a run from its latest encrypted checkpoint (``run.resume``).

The server seals a checkpoint at the end of every round, aggregated or failed: the global model,
the server optimizer's state (FedAdam's moments) and, in the header, the round, the fedpriv run
id, the ledger's length and head hash at that moment, and the run log (per-round metrics). A
resume uses it only if it authenticates with the key in the environment, its model fits the
configured one, and its ledger prefix is still the start of the run's verified ledger. What the
ledger recorded after the checkpoint (spends of a round the server crashed in) is kept: privacy
loss never resets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedpriv.common import checkpoint
from fedpriv.common.checkpoint import CheckpointError
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LEDGER
from fedpriv.common.ledger_schema import Kind
from fedpriv.common.replay import LedgerState
from fedpriv.common.settings import check_budgets, ledger_state, verified_entries

# Settings a resume cannot change: the delta epsilon is stated at, and what decides which records
# each client id holds (changing those would split a record's spending across client ids).
FIXED_ON_RESUME = (
    "privacy.delta", "run.seed", "federation.num_clients", "data.dataset", "data.test_fraction",
    "data.partitioning", "data.alpha", "data.classes_per_client",
)


@dataclass(frozen=True)
class RestorePoint:
    """An authenticated checkpoint: where the run continues from."""

    round: int
    run_id: str
    ledger_entries: int
    ledger_head: str
    weights: list[np.ndarray]
    optimizer: dict[str, list[np.ndarray]]  # server optimizer state (FedAdam: m_t, v_t)
    run_log: dict[str, Any]
    wall_time_s: float


def save(path: Path, key: bytes, *, server_round: int, run: str, run_id: str, ledger_entries: int,
         ledger_head: str, weights: list[np.ndarray], optimizer: Mapping[str, list[np.ndarray]],
         run_log: dict[str, Any], wall_time_s: float) -> None:
    """Seal the state a resume needs (the model's arrays first, then the optimizer's)."""
    arrays = [np.asarray(a) for a in weights]
    sizes = {}
    for name, state in optimizer.items():
        arrays += [np.asarray(a) for a in state]
        sizes[name] = len(state)
    header = {
        "round": server_round, "run": run, "run_id": run_id, "ledger_entries": ledger_entries,
        "ledger_head": ledger_head, "model_arrays": len(weights), "optimizer": sizes,
        "run_log": run_log, "wall_time_s": wall_time_s,
    }
    checkpoint.write_checkpoint(path, arrays, header, key, run_id=run_id)


def require_key() -> bytes:
    return checkpoint.require_key("resuming needs the key the run's checkpoint was sealed with")


def read(run_dir: Path, key: bytes, run_id: str | None = None) -> RestorePoint:
    """The run's checkpoint, authenticated and parsed (and bound to ``run_id``, when given)."""
    path = run_dir / checkpoint.CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {run_dir} ({checkpoint.CHECKPOINT}): the run stopped before "
                              f"its first round ended, or ran without a checkpoint key")
    arrays, header = checkpoint.read_checkpoint(path, key, run_id)
    try:
        models = int(header["model_arrays"])
        optimizer, at = {}, models
        for name, count in header["optimizer"].items():
            optimizer[str(name)] = arrays[at:at + int(count)]
            at += int(count)
        if at != len(arrays) or models < 1:
            raise ValueError("array count")
        return RestorePoint(
            round=int(header["round"]), run_id=str(header["run_id"]),
            ledger_entries=int(header["ledger_entries"]), ledger_head=str(header["ledger_head"]),
            weights=arrays[:models], optimizer=optimizer, run_log=dict(header["run_log"]),
            wall_time_s=float(header.get("wall_time_s", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {path} holds no resumable run state (written by an older "
                              f"fedpriv?)") from None


def check_model(point: RestorePoint, model: list[np.ndarray], run_dir: Path) -> None:
    found = [(a.shape, a.dtype) for a in point.weights]
    expected = [(np.shape(a), np.asarray(a).dtype) for a in model]
    if found != expected:
        raise CheckpointError(
            f"checkpoint {run_dir / checkpoint.CHECKPOINT} holds a model of {len(found)} arrays "
            f"{[tuple(s) for s, _ in found][:3]}..., which does not fit the configured model of "
            f"{len(expected)} arrays {[tuple(s) for s, _ in expected][:3]}...")


def check_ledger(point: RestorePoint, entries: list[dict[str, Any]], run_dir: Path) -> None:
    """The checkpoint's ledger (length, head hash) must be a prefix of the verified ledger."""
    n = point.ledger_entries
    if not (1 <= n <= len(entries) and entries[n - 1]["hash"] == point.ledger_head):
        raise CheckpointError(
            f"checkpoint {run_dir / checkpoint.CHECKPOINT} does not belong to the ledger in "
            f"{run_dir}: its entry {n - 1} is not the one the checkpoint recorded")
    if entries[0].get("kind") != Kind.RUN_START:
        raise FedprivError(f"{run_dir / LEDGER} does not begin with a run_start entry")
    run_id = entries[0].get("parameters", {}).get("run_id")
    if not run_id:
        raise FedprivError(
            f"{run_dir / LEDGER} has no run id (written by an older fedpriv): resuming it would "
            f"count the nodes' spending in it twice")
    if run_id != point.run_id:
        raise CheckpointError(f"checkpoint {run_dir / checkpoint.CHECKPOINT} belongs to another run "
                              f"({point.run_id}, not {run_id})")


def check_settings(entries: list[dict[str, Any]] | LedgerState, cfg: RunConfig) -> None:
    """Refuse a resume that changes a setting of :data:`FIXED_ON_RESUME` (delta above all) or
    relaxes a budget (:func:`check_budgets`)."""
    state = ledger_state(entries)
    check_budgets(state, cfg)
    start = state.runs[0] if state.runs else None
    delta = start.delta if start is not None else None
    if delta != cfg.privacy.delta:
        raise FedprivError(f"the run was accounted at delta {delta}; a resume cannot "
                           f"change it (privacy.delta is {cfg.privacy.delta:g})")
    recorded, current = (start.config if start is not None else None) or {}, cfg.to_flat()
    for key in FIXED_ON_RESUME:
        if key in recorded and recorded[key] != current.get(key):
            raise FedprivError(f"a resume cannot change {key} (the run has {recorded[key]!r}, the "
                               f"configuration {current.get(key)!r}): it decides what each client holds")


class NothingToResume(FedprivError):
    """The run's checkpoint is already at run.rounds."""


def remaining_rounds(cfg: RunConfig, point: RestorePoint, run_dir: Path) -> int:
    """Rounds left to run after the checkpoint; :class:`NothingToResume` if none."""
    remaining = cfg.run.rounds - point.round
    if remaining <= 0:
        raise NothingToResume(
            f"nothing left to resume: {run_dir} has completed {point.round} round(s) and run.rounds "
            f"is {cfg.run.rounds} (the run's total); raise it to continue, e.g. --set "
            f"run.rounds={point.round + 1}")
    return remaining


def inspect(run_dir: Path, model: list[np.ndarray], cfg: RunConfig) -> RestorePoint:
    """Every check a resume makes before it changes anything (``fedpriv simulate`` runs it
    before starting the federation; the server runs it again)."""
    key = require_key()
    entries = verified_entries(run_dir)
    point = read(run_dir, key, ledger_state(entries).run_id)
    check_model(point, model, run_dir)
    check_ledger(point, entries, run_dir)
    check_settings(entries, cfg)
    return point
