"""Witnesses of a run's ledger kept outside its run directory, so a rolled-back or re-signed
ledger is caught.

A signed ledger proves what it holds, not that it is the latest version: every earlier
``ledger.jsonl`` with its earlier signed head stays valid. So the run's heads are also witnessed
where whoever can write the run directory cannot reach:

- **The server's state.** Each time the server signs its run ledger's head, it writes the same
  signed head to ``<witness dir>/runs/<run id>.json`` (with the run directory and the signing
  key's public half), and keeps the public half of its ledger-signing key in
  ``<witness dir>/ledger-signing.pub``. The witness dir is ``$FEDPRIV_LEDGER_WITNESS``, else
  ``$FEDPRIV_HOME/ledger-witness`` (simulations); ``fedpriv server start`` sets it to
  ``STATE/ledger-witness`` for its runs (``STATE/runs/RUN``).
- **The nodes' own ledgers.** The server sends the head of its run ledger (entries and last hash)
  with every training message; a node records it, with its client id, in the spend it writes to
  its own signed ledger.

``fedpriv audit`` compares the run ledger with both (:mod:`common.audit`): a run ledger with
fewer entries than a witness saw, or another entry where the witness saw one, is a rollback or
a fork.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpriv.common.accounting import DPSGDSpend
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import (
    LEDGER, PUBLIC_KEY, canonical, key_id, load_public_key, public_pem, verify_head_signature,
    verify_ledger,
)
from fedpriv.common import rundir
from fedpriv.common.ledger_schema import Kind, client_actor
from fedpriv.common.replay import LedgerState, replay
from fedpriv.common.fileio import write_atomic

WITNESS_ENV = "FEDPRIV_LEDGER_WITNESS"
WITNESS_DIR = "ledger-witness"  # under $FEDPRIV_HOME, or a federation server's state directory
STATE_PUBLIC_KEY = "ledger-signing.pub"  # the server's current ledger key, in the witness dir
RUNS = "runs"

# Fields a node records in each spend of its own ledger (entry parameters).
NODE_RUN_HEAD = "run_head"  # {"entries": n, "head_hash": h}: the run ledger's head it was sent
NODE_CLIENT_ID = "client_id"  # the client id the run ledger records this node's spends under
NODE_RUN_ID = "run_id"


def witness_root(env: dict[str, str] | None = None) -> Path:
    """Where this process's server witnesses its runs' ledgers (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get(WITNESS_ENV):
        return Path(env[WITNESS_ENV])
    return rundir.fedpriv_home(env) / WITNESS_DIR


def run_witness_path(root: Path, run_id: str) -> Path:
    if not run_id or not all(c.isalnum() or c in "-_" for c in run_id):
        raise FedprivError(f"cannot witness a run with id {run_id!r}")
    return root / RUNS / f"{run_id}.json"


def export_public_key(root: Path, public_key: Ed25519PublicKey) -> Path:
    """Keep the signing key's public half in the server's witness dir (so an audit can pin it)."""
    path = root / STATE_PUBLIC_KEY
    pem = public_pem(public_key)
    if not path.exists() or path.read_bytes() != pem:
        write_atomic(path, pem)
    return path


def write_run_witness(path: Path, head: dict[str, Any], run_dir: Path, public_key: Ed25519PublicKey) -> None:
    record = {"head": head, "run_dir": str(run_dir.resolve()), "public_key": public_pem(public_key).decode()}
    write_atomic(path, canonical(record) + b"\n")


def node_run_head(entries: int, head_hash: str) -> str:
    """The run head as the server sends it in a training message's config."""
    return f"{entries}:{head_hash}"


def parse_node_run_head(raw: Any) -> dict[str, Any] | None:
    """The run head a training message carried, or None (absent or malformed)."""
    if not isinstance(raw, str) or ":" not in raw:
        return None
    count, _, head_hash = raw.partition(":")
    if not count.isdigit() or len(head_hash) != 64 or any(c not in "0123456789abcdef" for c in head_hash):
        return None
    return {"entries": int(count), "head_hash": head_hash}


# ---- the audit's side --------------------------------------------------------------------------
def audit_witness_root(run_dir: Path) -> Path:
    """The witness dir of the server a run belongs to: ``STATE/ledger-witness`` for a run in
    ``STATE/runs/RUN`` that has one, else :func:`witness_root`."""
    candidate = rundir.state_of_run(run_dir) / WITNESS_DIR
    return candidate if candidate.is_dir() else witness_root()


def _unverified_run_id(run_dir: Path) -> str | None:
    """The run id the ledger's first line names (only to find its witness; verified later)."""
    try:
        with (run_dir / LEDGER).open("rb") as handle:
            first = json.loads(handle.readline().decode("utf-8"))
        run_id = first["parameters"]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) else None


def _read_witness(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        if not (isinstance(record, dict) and isinstance(record.get("head"), dict)):
            return None
        return record
    except (OSError, ValueError):
        return None


def find_run_witness(root: Path, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The server's witness of this run: by the run id the ledger names, else by directory."""
    run_id = _unverified_run_id(run_dir)
    if run_id:
        try:
            path = run_witness_path(root, run_id)
        except FedprivError:
            path = None
        if path is not None and path.is_file():
            record = _read_witness(path)
            if record is not None:
                return path, record
    here = str(run_dir.resolve())
    for path in sorted((root / RUNS).glob("*.json")) if (root / RUNS).is_dir() else []:
        record = _read_witness(path)
        if record is not None and record.get("run_dir") == here:
            return path, record
    return None


def resolve_audit_key(run_dir: Path, public_key: Path | None) -> dict[str, Any]:
    """Which key the audit verifies the run ledger with, and why.

    A key given with ``--public-key`` is pinned. Otherwise the server's state pins it: the key
    in the server's witness of this run, else the server's current key (``ledger-signing.pub``
    in its witness dir). Only when neither exists is ``ledger.pub`` trusted from the run
    directory, which proves nothing against whoever can write that directory.
    """
    root = audit_witness_root(run_dir)
    witness = find_run_witness(root, run_dir)
    if public_key is not None:
        key, source, pinned = load_public_key(public_key), f"--public-key {public_key}", True
    elif witness is not None:
        try:
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_public_key(witness[1]["public_key"].encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise FedprivError(f"the server's witness {witness[0]} holds no readable public key ({exc})") from None
        source, pinned = f"the server's witness of this run, {witness[0]}", True
    elif (root / STATE_PUBLIC_KEY).is_file():
        key, source, pinned = load_public_key(root / STATE_PUBLIC_KEY), f"the server's state, {root / STATE_PUBLIC_KEY}", True
    else:
        key, source, pinned = None, f"{PUBLIC_KEY} in the run directory (NOT pinned)", False
        if (run_dir / PUBLIC_KEY).is_file():
            key = load_public_key(run_dir / PUBLIC_KEY)
    return {"key": key, "fingerprint": key_id(key) if key is not None else None, "source": source,
            "pinned": pinned, "witness_root": root, "witness": witness}


def prefix_problem(entries: list[dict[str, Any]], count: Any, head_hash: Any) -> str | None:
    """Why a ledger of ``entries`` is not an extension of a witnessed head, or None."""
    if not isinstance(count, int) or count < 0:
        return "the witnessed head is malformed"
    if count > len(entries):
        return f"the run ledger has {len(entries)} entries, the witness saw {count}: it was rolled back"
    if count and entries[count - 1].get("hash") != head_hash:
        return f"the run ledger's entry {count - 1} is not the one the witness saw: it was replaced (a fork)"
    return None


def check_server_witness(resolved: dict[str, Any], entries: list[dict[str, Any]],
                         run_id: str | None) -> tuple[list[str], list[str]]:
    """Compare the verified run ledger with the server's witness: (failures, notes)."""
    witness = resolved["witness"]
    if witness is None:
        return [], [f"the server state at {resolved['witness_root']} holds no witness of this run "
                    "(a run made elsewhere or before witnesses existed): a rollback cannot be ruled out"]
    path, record = witness
    head = dict(record["head"])
    where = f"the server's witness {path}"
    try:
        key = resolved["key"]
        if key is None or not verify_head_signature(head, key):
            return [f"{where} is not signed by the ledger key"], []
    except (ValueError, TypeError):
        return [f"{where} is corrupt"], []
    failures = []
    if head.get("run_id") != run_id:
        failures.append(f"{where} is of run {head.get('run_id')}, the ledger names run {run_id}")
    problem = prefix_problem(entries, head.get("entries"), head.get("head_hash"))
    if problem:
        failures.append(f"rollback: {problem} ({where})")
    return failures, []


# ---- node ledgers ------------------------------------------------------------------------------
def _spend_key(round_: Any, parameters: dict[str, Any]) -> tuple[Any, ...]:
    spend = DPSGDSpend.from_json(parameters)
    return (round_, spend.sampling_probability, spend.noise_multiplier, spend.steps)


def check_node_ledger(path: Path, run_id: str | None, run_entries: list[dict[str, Any]],
                      run_state: LedgerState) -> dict[str, Any]:
    """Cross-check one node's own ledger (its state directory, or its ``ledger.jsonl``) with the
    verified run ledger (its entries and their replay): the node's ledger must verify, every run head it was sent must be a
    prefix of the run ledger, and every spend the run ledger recorded for the node's client must
    be in the node's ledger (a node ledger rolled back below them would let the node spend again).
    Returns ``{"node_ledger", "client_id", "spends", "failures", "notes"}``."""
    directory = path.parent if path.name == LEDGER else path
    where = f"node ledger {directory}"
    out: dict[str, Any] = {"node_ledger": str(directory), "client_id": None, "spends": 0, "key": None,
                           "failures": [], "notes": []}
    if not (directory / LEDGER).is_file():
        out["failures"].append(f"{where}: no {LEDGER} there")
        return out
    try:
        node_key = load_public_key(directory / PUBLIC_KEY)
    except FedprivError as exc:
        out["failures"].append(f"{where}: {exc}")
        return out
    out["key"] = key_id(node_key)
    verified = verify_ledger(directory, node_key, crash_tail=True)
    if not verified.ok:
        out["failures"].append(f"{where} does not verify: {verified.failures[0]}")
        return out
    node_state = replay(verified.entries)
    mine = sorted((s for spends in node_state.actors.values() for s in spends.of_kind(Kind.RECORD_LEVEL)
                   if s.parameters.get(NODE_RUN_ID) == run_id), key=lambda s: s.seq)
    out["spends"] = len(mine)
    if not mine:
        out["notes"].append(f"{where} records no spend in this run")
        return out
    for spend in mine:
        head = spend.parameters.get(NODE_RUN_HEAD)
        if isinstance(head, dict):
            problem = prefix_problem(run_entries, head.get("entries"), head.get("head_hash"))
            if problem:
                out["failures"].append(f"rollback: {problem} ({where}, its entry {spend.seq})")
    clients = {str(s.parameters.get(NODE_CLIENT_ID)) for s in mine
               if s.parameters.get(NODE_CLIENT_ID) is not None}
    if not clients:
        out["notes"].append(f"{where} names no client id (written by an older fedpriv): its spends "
                            "cannot be matched with the run's")
        return out
    if len(clients) > 1:
        out["failures"].append(f"{where} records spends in this run under several client ids {sorted(clients)}")
        return out
    (client_id,) = clients
    out["client_id"] = client_id
    try:
        node_spends = [_spend_key(s.round, s.parameters) for s in mine]
        run_client = run_state.actors.get(client_actor(client_id))
        run_spends = [_spend_key(s.round, s.parameters)
                      for s in (run_client.of_kind(Kind.RECORD_LEVEL) if run_client is not None else [])]
    except (KeyError, TypeError, ValueError) as exc:
        out["failures"].append(f"{where}: a spend cannot be read ({exc})")
        return out
    remaining = list(node_spends)
    missing = []
    for spend in run_spends:
        if spend in remaining:
            remaining.remove(spend)
        else:
            missing.append(spend)
    if missing:
        out["failures"].append(
            f"rollback: the run ledger records {len(run_spends)} spend(s) of client {client_id}, "
            f"{len(missing)} of them (rounds {sorted({m[0] for m in missing})}) missing from {where}: "
            "the node's ledger was rolled back or replaced, and its budget no longer counts them")
    if remaining:
        out["notes"].append(
            f"{where} records {len(remaining)} spend(s) in rounds {sorted({m[0] for m in remaining})} that "
            f"the run ledger lacks for client {client_id} (replies that never counted: dropped, rejected "
            "or lost in a server crash); the node's own budget counts them")
    return out
