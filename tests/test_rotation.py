"""``fedpriv keys rotate``: a run's sealed files and a sealed data file are sealed again with a new
key, the ledger records it, and the run then resumes and audits with the new key alone."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedpriv.common import checkpoint, keyfiles
from fedpriv.common.checkpoint import CheckpointError
from fedpriv.common.ledger import verify_ledger
from tests.conftest import run_cli_here, simulate_run

pytestmark = pytest.mark.slow

SETTINGS = ["run.rounds=1", "federation.num_clients=3", "federation.min_available_clients=3",
            "data.dataset=digits", "model.name=mlp", "model.mlp_units=16"]


def test_rotation_reseals_records_and_the_run_resumes_and_audits(tmp_path, own_server_state):
    home = tmp_path / "home"
    key_file = tmp_path / "sealing.key"
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery\n")
    old = checkpoint.new_key()
    env = {**os.environ, "FEDPRIV_HOME": str(home), checkpoint.KEY_FILE_ENV: str(key_file),
           keyfiles.PASSPHRASE_FILE_ENV: str(passphrase)}
    env.pop(checkpoint.KEY_ENV, None)
    key_file.write_bytes(checkpoint.encode_key(old, b"correct horse battery"))  # a protected key file
    run = tmp_path / "run"
    proc, _ = simulate_run(run, SETTINGS, env=env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((8, 4)), y=np.arange(8) % 2)
    assert run_cli_here("data", "seal", str(tmp_path / "d.npz"), "--out", str(tmp_path / "d.sealed"),
                        env=env).returncode == 0
    before = verify_ledger(run).entries

    done = run_cli_here("keys", "rotate", str(run), "--data", str(tmp_path / "d.sealed"), env=env)
    assert done.returncode == 0, done.stderr
    new = checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(key_file),
                                           keyfiles.PASSPHRASE_FILE_ENV: str(passphrase)})
    assert new != old and keyfiles.is_protected(key_file.read_bytes())  # still protected
    assert not key_file.with_name("sealing.key.next").exists()
    # Every sealed file opens with the new key only.
    for path, reader in ((run / checkpoint.CHECKPOINT, lambda p, k: checkpoint.read_checkpoint(p, k)),
                         (run / "model.sealed", lambda p, k: checkpoint.read_model(p, k, None)),
                         (tmp_path / "d.sealed", checkpoint.read_data)):
        reader(path, new)
        with pytest.raises(CheckpointError, match="altered, or the key is wrong"):
            reader(path, old)
    # The ledger records it, signed and chained after what was there.
    after = verify_ledger(run)
    assert after.ok and after.entries[:len(before)] == before
    (rotation,) = [e for e in after.entries if e["kind"] == "key_rotation"]
    assert rotation["parameters"]["files"] == ["checkpoint.fpck", "model.sealed"]
    assert rotation["parameters"]["old_key"] != rotation["parameters"]["new_key"]

    audit = run_cli_here("audit", str(run), "--json", env=env)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], report["failures"]
    assert [r["ledger_entry"] for r in report["key_rotations"]] == [rotation["seq"]]
    proc, summary = simulate_run(run, ["run.rounds=2"], env=env, resume=True, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    audit = run_cli_here("audit", str(run), "--json", env=env)
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"], audit.stdout[-2000:]
    # The old key no longer opens what the resumed run sealed either.
    with pytest.raises(CheckpointError):
        checkpoint.read_checkpoint(run / checkpoint.CHECKPOINT, old)
