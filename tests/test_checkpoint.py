"""Global-model checkpoints encrypted at rest with AES-GCM."""

from __future__ import annotations

import base64
import stat

import numpy as np
import pytest

from fedpriv.common import checkpoint
from fedpriv.common.checkpoint import CheckpointError


def _arrays():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 3)).astype(np.float32), np.arange(5, dtype=np.int64)]


def test_round_trip_and_ciphertext_reveals_nothing(tmp_path):
    key = checkpoint.new_key()
    path = tmp_path / "checkpoint.fpck"
    checkpoint.write_checkpoint(path, _arrays(), {"round": 3, "ledger_head": "ab"}, key)
    arrays, header = checkpoint.read_checkpoint(path, key)
    assert header == {"round": 3, "ledger_head": "ab"}
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, _arrays()))
    data = path.read_bytes()
    assert _arrays()[0].tobytes() not in data and b"ledger_head" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Fresh nonce every time: the same content never encrypts to the same bytes.
    assert checkpoint.seal(_arrays(), {}, key) != checkpoint.seal(_arrays(), {}, key)


def test_any_flipped_byte_truncation_or_wrong_key_is_refused(tmp_path):
    key = checkpoint.new_key()
    data = checkpoint.seal(_arrays(), {"round": 1}, key)
    for position in (0, len(checkpoint.MAGIC), len(checkpoint.MAGIC) + 12, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises(CheckpointError):
            checkpoint.unseal(bytes(tampered), key)
    with pytest.raises(CheckpointError, match="altered, or the key is wrong"):
        checkpoint.unseal(data, checkpoint.new_key())
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.unseal(data[:20], key)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.read_checkpoint(tmp_path / "missing.fpck", key)


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
    checkpoint.write_checkpoint(path, _arrays(), {"round": 1}, key)
    before = path.read_bytes()
    script = (
        "import base64, os, signal, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from fedpriv.common import checkpoint\n"
        "def killed(fd):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.fsync = killed\n"
        "checkpoint.write_checkpoint(Path(sys.argv[1]), [np.ones(1000)], {'round': 2}, base64.b64decode(sys.argv[2]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(path), base64.b64encode(key).decode()], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before
    _, header = checkpoint.read_checkpoint(path, key)
    assert header == {"round": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{checkpoint.CHECKPOINT}.")]  # the torn temp
