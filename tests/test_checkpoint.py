"""Sealed artefacts (checkpoints, the final model): AES-256-GCM at rest, bound to their run and role."""

from __future__ import annotations

import base64
import stat

import numpy as np
import pytest

from fedpriv.common import checkpoint
from fedpriv.common.checkpoint import CheckpointError


RUN = "a" * 32


def _seal(arrays, header, key, role=checkpoint.ROLE_CHECKPOINT, run_id=RUN):
    return checkpoint.seal(arrays, header, key, role=role, run_id=run_id)


def _unseal(data, key, role=checkpoint.ROLE_CHECKPOINT, run_id=RUN):
    return checkpoint.unseal(data, key, role=role, run_id=run_id)


def _arrays():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 3)).astype(np.float32), np.arange(5, dtype=np.int64)]


def test_round_trip_and_ciphertext_reveals_nothing(tmp_path):
    key = checkpoint.new_key()
    path = tmp_path / "checkpoint.fpck"
    checkpoint.write_checkpoint(path, _arrays(), {"round": 3, "ledger_head": "ab"}, key, run_id=RUN)
    arrays, header = checkpoint.read_checkpoint(path, key, RUN)
    assert header == {"round": 3, "ledger_head": "ab"}
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, _arrays()))
    data = path.read_bytes()
    assert _arrays()[0].tobytes() not in data and b"ledger_head" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Fresh nonce every time: the same content never encrypts to the same bytes.
    assert _seal(_arrays(), {}, key) != _seal(_arrays(), {}, key)


def test_any_flipped_byte_truncation_or_wrong_key_is_refused(tmp_path):
    key = checkpoint.new_key()
    data = _seal(_arrays(), {"round": 1}, key)
    for position in (0, len(checkpoint.MAGIC), len(checkpoint.MAGIC) + 12, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises(CheckpointError):
            _unseal(bytes(tampered), key)
    with pytest.raises(CheckpointError, match="altered, or the key is wrong"):
        _unseal(data, checkpoint.new_key())
    with pytest.raises(CheckpointError, match="truncated"):
        _unseal(data[:20], key)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.read_checkpoint(tmp_path / "missing.fpck", key)


def test_a_sealed_file_moved_between_runs_or_roles_is_refused():
    key = checkpoint.new_key()
    model = _seal(_arrays(), {}, key, role=checkpoint.ROLE_MODEL, run_id=RUN)
    assert _unseal(model, key, role=checkpoint.ROLE_MODEL, run_id=RUN)[1] == {}
    with pytest.raises(CheckpointError, match="is a sealed model, not a checkpoint"):
        _unseal(model, key, role=checkpoint.ROLE_CHECKPOINT, run_id=RUN)
    with pytest.raises(CheckpointError, match=f"sealed for run {RUN}, not for this run"):
        _unseal(model, key, role=checkpoint.ROLE_MODEL, run_id="b" * 32)
    # Editing the readable binding to pass the name check breaks authentication: the binding is
    # the associated data of AES-GCM (checked with cryptography's AESGCM itself, not fedpriv's code).
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    forged = model.replace(RUN.encode(), b"b" * 32, 1)
    with pytest.raises(CheckpointError, match="altered, or the key is wrong"):
        _unseal(forged, key, role=checkpoint.ROLE_MODEL, run_id="b" * 32)
    end = model.index(b"}") + 1
    nonce, body = model[end:end + 12], model[end + 12:]
    AESGCM(key).decrypt(nonce, body, model[:end])  # the format as documented
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonce, body, forged[:end])
    with pytest.raises(CheckpointError, match="older fedpriv"):
        _unseal(b"FPCKPT01" + bytes(64), key)


def test_the_key_comes_from_the_environment_only(tmp_path):
    key = checkpoint.new_key()
    assert checkpoint.key_from_environment({}) is None
    assert checkpoint.key_from_environment({checkpoint.KEY_ENV: base64.b64encode(key).decode()}) == key
    key_file = tmp_path / "checkpoint.key"
    key_file.write_bytes(checkpoint.encode_key(key))
    assert checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(key_file)}) == key
    with pytest.raises(CheckpointError, match="not a checkpoint key"):
        checkpoint.key_from_environment({checkpoint.KEY_ENV: "too-short"})
    with pytest.raises(CheckpointError, match="cannot read checkpoint key file"):
        checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(tmp_path / "nope")})


def test_an_unusable_key_stops_a_run_before_it_starts(cli_here, tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint.KEY_ENV, "not-a-key")
    out = tmp_path / "run"
    proc = cli_here("simulate", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FEDPRIV_CHECKPOINT_KEY is not a checkpoint key" in lines[0]
    assert not out.exists()


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL while the new checkpoint is being written (its bytes on disk, not yet
    renamed into place): the previous checkpoint is still there, whole, and still opens."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    key = checkpoint.new_key()
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.write_checkpoint(path, _arrays(), {"round": 1}, key, run_id=RUN)
    before = path.read_bytes()
    script = (
        "import base64, os, signal, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from fedpriv.common import checkpoint\n"
        "def killed(fd):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.fsync = killed\n"
        "checkpoint.write_checkpoint(Path(sys.argv[1]), [np.ones(1000)], {'round': 2}, base64.b64decode(sys.argv[2]), run_id='r')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(path), base64.b64encode(key).decode()], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before
    _, header = checkpoint.read_checkpoint(path, key)
    assert header == {"round": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{checkpoint.CHECKPOINT}.")]  # the torn temp
