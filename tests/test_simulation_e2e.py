"""End to end: `fedpriv simulate` with 3 virtual clients and 2 rounds, every output checked.

It runs in the pytest process, its virtual nodes on threads (tests/inprocess.py): what it checks
is fedpriv's, not the runtime's. The same command on Flower's Ray runtime, in a fresh process, runs
in tests/test_load.py (50 clients a round), the scale benchmark (tests/test_benchmarks_quick.py)
and, through Flower's own tooling, tests/test_flower_run.py."""

import base64
import csv
import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest

from fedpriv.common import checkpoint, stored_files
from fedpriv.common.ledger import verify_ledger
from tests.conftest import (assert_listed, assert_private, files_containing, poisson_gaussian_epsilon, raw_byte_runs, run_cli_here,
                            run_model)

pytestmark = pytest.mark.slow

SETTINGS = [
    "run.rounds=2", "federation.num_clients=3", "federation.min_available_clients=3",
    "client.local_epochs=1", "client.batch_size=64", "dp.noise_multiplier=1.1",
]


def _expected_epsilon(n, batch, rounds, z, delta):
    """dp-accounting called directly: Poisson-sampled Gaussian, every step of every round."""
    return poisson_gaussian_epsilon(batch / n, z, rounds * math.ceil(n / batch), delta)


def test_three_clients_two_rounds(cli_here, tmp_path, monkeypatch, loose_umask):
    """(Under umask 022, the usual one: fedpriv's files must be owner-only all the same.)"""
    key = checkpoint.new_key()  # checkpoints are encrypted at rest when a key is configured
    monkeypatch.setenv(checkpoint.KEY_ENV, base64.b64encode(key).decode())
    monkeypatch.setenv("FEDPRIV_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["simulate"] + [item for s in SETTINGS for item in ("--set", s)] + ["--out", str(out)]
    proc = cli_here(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "round 2/2" in proc.stdout  # progress lines (no terminal under pytest)
    assert assert_private(out, tmp_path / "home") > 10  # run directory, keys, node ledgers

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["clients_failed"] == 0 for r in summary["rounds"])
    # It really learned: better than the untrained model and well above chance (0.1).
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.15
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"]

    privacy = summary["privacy"]
    assert privacy["delta"] == 1e-5
    clients = privacy["record_level"]["clients"]
    assert sorted(clients) == ["0", "1", "2"]
    # Every client runs the public schedule: ceil(training records / 3) records at batch 64.
    n = math.ceil(summary["dataset"]["train_examples"] / 3)
    for client_id, eps in clients.items():
        assert eps == pytest.approx(_expected_epsilon(n, 64, 2, 1.1, 1e-5), rel=1e-6)
    assert privacy["record_level"]["max_epsilon"] == pytest.approx(max(clients.values()))
    # Epsilon per round is cumulative: it grows from round 1 to round 2.
    assert summary["rounds"][0]["record_epsilon_max"] < summary["rounds"][1]["record_epsilon_max"]
    assert summary["config"]["federation"]["num_clients"] == 3
    arrays, header = checkpoint.read_checkpoint(out / checkpoint.CHECKPOINT, key)
    assert header["round"] == 2 and header["ledger_entries"] > 0
    model = run_model(out)  # sealed, bound to the run
    assert all(np.array_equal(a, b) for a, b in zip(arrays, model, strict=True))
    secure = summary["secure_aggregation"]  # on by default: 3 clients get 3 shares, threshold 2
    assert secure["enabled"] and (secure["num_shares"], secure["reconstruction_threshold"]) == (3, 2)
    assert secure["model_parameters"] == summary["model_parameters"] > 0

    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[1]["accuracy"]) == pytest.approx(summary["final_accuracy"])
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(model) == 10  # 5 layers with weights, kernel + bias each
    # Sealed at rest: no file fedpriv wrote holds the model's weights in plaintext.
    # Nor any training record of the clients.
    from fedpriv.common.config import load_config
    from fedpriv.common.data import load_dataset

    cfg = load_config(overrides=SETTINGS)
    records = load_dataset(cfg.data, cfg.run.seed).x_train
    assert files_containing([out, tmp_path / "home"], raw_byte_runs(model) + raw_byte_runs([records])) == []
    # Every file is in the README's table of stored files, sealed or signed as it says.
    assert assert_listed(out, stored_files.RUN) >= 20 and assert_listed(tmp_path / "home", stored_files.HOME) >= 3

    # The untouched run's ledger verifies and replays to the same figures.
    audit = run_cli_here("audit", str(out), "--json")  # (in this process: it starts no federation)
    assert audit.returncode == 0, audit.stdout[-2000:]
    report = json.loads(audit.stdout)
    assert report["ledger_ok"] and report["budget_ok"] and report["consistent"]
    for client_id, eps in clients.items():
        assert report["epsilon"]["record_level"][client_id]["rdp"] == pytest.approx(eps, rel=1e-6)
    assert report["epsilon"]["user_level"] is None  # user-level DP was off
    # Witnessed outside the run directory: the audit pinned the key from the server's state (the
    # one simulate printed), compared the server's witness, and cross-checked every simulated
    # node's own ledger, which recorded the run head it was sent with each spend.
    printed = summary["privacy"]["ledger_key"]
    assert f"ledger signed by key {printed['fingerprint']}" in " ".join(proc.stdout.split())
    assert report["key"]["pinned"] and report["key"]["fingerprint"] == printed["fingerprint"]
    assert report["witness"] and not report["notes"], report["notes"]
    nodes = report["node_ledgers"]
    assert sorted(n["client_id"] for n in nodes) == ["0", "1", "2"] and all(n["spends"] == 2 for n in nodes)
    node_dirs = [d for d in (out / "nodes").iterdir() if (d / "ledger.jsonl").is_file()]
    assert len(node_dirs) == 3
    for node_dir in node_dirs:
        spends = [e for e in verify_ledger(node_dir).entries if e["kind"] == "record_level"]
        assert [e["parameters"]["run_head"]["entries"] > 0 for e in spends] == [True, True]

    # A plaintext copy on purpose: fedpriv model export, with the audited privacy statement beside it.
    exported = tmp_path / "export" / "model.npz"
    done = run_cli_here("model", "export", str(out), "--out", str(exported))
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(exported) as copy:
        assert [copy[f"arr_{i}"].tolist() for i in range(len(copy.files))] == [a.tolist() for a in model]
    statement = json.loads(exported.with_name("model.npz.privacy.json").read_text())
    assert statement["run"]["run_id"] == report["run_id"] and statement["audit"]["ok"]
    assert statement["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    # the model card's statement, as fedpriv review gives it: the audit's largest epsilon
    worst = max(report["epsilon"]["record_level"].values(), key=lambda f: f["rdp"])
    assert statement["model_card"]["record_level"]["epsilon_rdp"] == worst["rdp"]
    assert statement["model_card"]["units"][0]["unit"] == "record"
    for client_id in clients:
        assert statement["privacy"]["epsilon"]["record_level"][client_id]["rdp"] == pytest.approx(
            _expected_epsilon(n, 64, 2, 1.1, 1e-5), rel=1e-6)
    assert "plaintext" in done.stdout and not done.stderr
    again = run_cli_here("model", "export", str(out), "--out", str(exported))
    assert again.returncode == 2 and "exists" in again.stderr  # never replaced without --force

    # The sealed files refuse to be swapped between roles, opened with a wrong key or altered.
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    shutil.copy(out / checkpoint.CHECKPOINT, swapped / "model.sealed")
    refused = run_cli_here("model", "export", str(swapped), "--out", str(tmp_path / "x.npz"))
    assert refused.returncode == 2 and "is a sealed checkpoint, not a model" in refused.stderr
    shutil.copy(out / "model.sealed", swapped / "model.sealed")
    data = bytearray((swapped / "model.sealed").read_bytes())
    data[-40] ^= 1
    (swapped / "model.sealed").write_bytes(bytes(data))
    for env, needle in (({}, "failed authentication: it was altered, or the key is wrong"),
                        ({**os.environ, checkpoint.KEY_ENV: base64.b64encode(checkpoint.new_key()).decode()},
                         "failed authentication")):
        target = swapped if not env else out
        refused = run_cli_here("model", "export", str(target), "--out", str(tmp_path / "x.npz"), env=env or None)
        assert refused.returncode == 2 and needle in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "x.npz").exists()
