"""Rotating the sealing key (``fedpriv keys rotate``): every sealed artefact of the given runs (the
checkpoint, the final model) and the given sealed data files is opened with the old key and sealed
again with a new one, each run's ledger records the rotation (a signed ``key_rotation`` entry,
witnessed like every other), and only then does the new key replace the old in its file.

A rotation that stops part-way can be run again: the new key waits in ``KEYFILE.next`` until the
end, a file already sealed with it is left as it is, and a run whose ledger already records this
rotation is not recorded twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedpriv.common import checkpoint, key_providers, keyfiles, rundir, witness
from fedpriv.common.checkpoint import CheckpointError
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import create_private, fsync_directory
from fedpriv.common.ledger import LEDGER, LedgerWriter, ledger_run_id, load_or_create_signing_key, verify_ledger
from fedpriv.common.ledger_schema import SERVER, Kind

NEXT_SUFFIX = ".next"
RUN_ARTEFACTS = ((rundir.CHECKPOINT, checkpoint.ROLE_CHECKPOINT), (rundir.MODEL, checkpoint.ROLE_MODEL))


@dataclass
class Rotation:
    old_id: str
    new_id: str
    resealed: list[Path] = field(default_factory=list)
    already: list[Path] = field(default_factory=list)  # sealed with the new key by an interrupted rotation
    recorded: list[Path] = field(default_factory=list)  # run ledgers the rotation was recorded in


def _reseal(path: Path, role: str, run_id: str, old: bytes, new: bytes, done: Rotation) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FedprivError(f"cannot read {path} ({exc.strerror})") from None
    try:
        arrays, header = checkpoint.unseal(data, old, str(path), role=role, run_id=run_id)
    except CheckpointError as exc:
        try:  # an interrupted rotation may have sealed it with the new key already
            checkpoint.unseal(data, new, str(path), role=role, run_id=run_id)
        except CheckpointError:
            raise exc from None
        done.already.append(path)
        return
    checkpoint.write_sealed(path, arrays, header, new, role=role, run_id=run_id)  # (unseal checked the binding)
    done.resealed.append(path)


def _signing_key_path(run_dir: Path, given: Path | None) -> Path:
    """The key that signs the run's ledger: ``given``, else the server state's (``STATE/keys``
    for a run in ``STATE/runs``), else the one ``fedpriv simulate`` uses."""
    if given is None:
        state_keys = rundir.state_of_run(run_dir) / rundir.STATE_KEYS_LINK / rundir.LEDGER_SIGNING_KEY
        given = state_keys if state_keys.is_file() else rundir.ledger_signing_key_path()
    if not given.is_file():
        raise FedprivError(f"the ledger-signing key {given} is not there; give the run's with --ledger-key")
    return given


def rotate(key_file: Path, runs: list[Path], data_files: list[Path], ledger_key: Path | None = None) -> Rotation:
    """Rotate the sealing key in ``key_file`` (see the module docstring)."""
    if key_providers.is_pkcs11(key_file):
        raise FedprivError("the sealing key is in a PKCS#11 token: rotate it with the token's own tools (make a new "
                           "key, then seal the files again with it), not with fedpriv keys rotate")
    if not key_file.is_file():
        raise FedprivError(f"no sealing key file at {key_file}")
    old = checkpoint.key_from_file(key_file)
    secret = keyfiles.passphrase() if keyfiles.is_protected(key_file.read_bytes()) else None
    pending = key_file.with_name(key_file.name + NEXT_SUFFIX)
    if pending.exists():  # an interrupted rotation: finish it with the key it had chosen
        new = checkpoint.key_from_file(pending)
    else:
        new = checkpoint.new_key()
        create_private(pending, checkpoint.encode_key(new, secret))
    done = Rotation(checkpoint.key_id(old), checkpoint.key_id(new))
    checked = []
    for run_dir in runs:  # check every run before changing any
        _signing_key_path(run_dir, ledger_key)
        verified = verify_ledger(run_dir)
        if not verified.ok:
            raise FedprivError(f"{run_dir / LEDGER} does not verify ({verified.failures[0]}); not rotating")
        run_id = ledger_run_id(verified.entries)
        if run_id is None:
            raise FedprivError(f"{run_dir / LEDGER} names no run id: not a run ledger")
        checked.append((run_dir, run_id, verified.entries))
    for path in data_files:
        _reseal(path, checkpoint.ROLE_DATA, "", old, new, done)
    for run_dir, run_id, entries in checked:
        files = []
        for name, role in RUN_ARTEFACTS:
            if (run_dir / name).is_file():
                _reseal(run_dir / name, role, run_id, old, new, done)
                files.append(name)
        if any(e.get("kind") == Kind.KEY_ROTATION and (e.get("parameters") or {}).get("new_key") == done.new_id
               for e in entries):
            continue
        writer = LedgerWriter(run_dir, load_or_create_signing_key(_signing_key_path(run_dir, ledger_key)))
        witness_path = witness.run_witness_path(witness.audit_witness_root(run_dir), run_id)
        if witness_path.is_file():  # the server's witness of the run follows its ledger
            public_key = writer.key.public_key()
            writer.witness = lambda head, p=witness_path, d=run_dir: witness.write_run_witness(p, head, d, public_key)
        writer.append(actor=SERVER, kind=Kind.KEY_ROTATION,
                      parameters={"old_key": done.old_id, "new_key": done.new_id, "files": files},
                      note="the sealing key was rotated; these files were sealed again with the new key")
        done.recorded.append(run_dir)
    os.replace(pending, key_file)
    fsync_directory(key_file.parent)
    return done

