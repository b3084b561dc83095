"""Kill the server process with SIGKILL in the middle of a run, resume it, and finish: the ledger
audits clean, epsilon is what an uninterrupted run with the same seed reaches (plus, for a kill
after replies arrived, exactly the spends the killed attempt made), and no round is counted twice."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv.common import checkpoint
from fedpriv.common.accounting import DPSGDSpend
from fedpriv.common.ledger import verify_ledger
from fedpriv.server import resume
from tests.injected import PAUSED
from tests.conftest import ROOT, dp_sgd_epsilon, run_cli_here, simulate_run

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_kill_resume")

DELTA = 1e-5
ROUNDS = 4
# The small MLP on scikit-learn's digits: what is tested is the kill and the resume, not the model.
# (With four clients, user-level noise leaves any model near chance, so two runs' final accuracies
# differ only by noise: what shows that the resume continued the killed run is its restored
# history, checked against the checkpoint the killed process sealed.)
SETTINGS = [
    "data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", f"run.rounds={ROUNDS}", f"privacy.delta={DELTA}", "federation.num_clients=4", "federation.min_available_clients=4",
    "client.local_epochs=1", "client.batch_size=64", "secure_aggregation.num_shares=3",
    "secure_aggregation.reconstruction_threshold=2", "user_dp.enabled=true",
]


def _rdp(spends: list[DPSGDSpend]) -> float:
    return dp_sgd_epsilon(spends, DELTA)


PAUSE_AFTER_ROUND = "--pause-after-round"  # after round N's checkpoint
PAUSE_IN_ROUND = "--pause-in-round"  # round N's replies recorded, before aggregating


def _killed_run(out: Path, env: dict[str, str], pause: str, at_round: int) -> None:
    """Start ``fedpriv simulate`` in a process of its own with the test harness's pausing strategy
    (tests/injected.py; its virtual nodes on threads of that process), wait until it holds the
    server at ``at_round``, then SIGKILL the whole process group: a machine crash."""
    args = [sys.executable, "-m", "tests.injected", "--threads", pause, str(at_round), "--",
            "simulate", "--preset", "quickstart", "--out", str(out)]
    args += [x for s in SETTINGS for x in ("--set", s)]
    # its temporary files (the simulation's Ray directory, made before the kill) in the test's own
    # folder: a killed process cannot remove them, and the test's folder is removed for it
    env = {**env, "TMPDIR": str(out.parent)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, seen = time.monotonic() + 600, []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(PAUSED):
                break
            assert time.monotonic() < deadline, "the run never reached the pause"
        else:
            pytest.fail("the run ended before the pause:\n" + "".join(seen[-30:]))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really died mid-run


@pytest.fixture(scope="module")
def key_env():
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
            checkpoint.KEY_ENV: base64.b64encode(checkpoint.new_key()).decode()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, key_env):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc, summary = simulate_run(out, SETTINGS, env=key_env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return verify_ledger(out).entries, summary


def _spends(entries: list[dict], cid: str) -> list[DPSGDSpend]:
    return [DPSGDSpend.from_json(e["parameters"]) for e in entries
            if e["kind"] == "record_level" and e["actor"] == f"client:{cid}"]


def _resume_and_check(out: Path, env: dict[str, str], uninterrupted: tuple[list[dict], dict]) -> tuple[dict, list[dict]]:
    # (in this process: the one that held the run is dead, and nothing of it is in this one)
    killed = resume.read(out, base64.b64decode(env[checkpoint.KEY_ENV]))  # what the killed process sealed
    proc, summary = simulate_run(out, [], env=env, resume=True, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"resuming after round {killed.round}" in proc.stdout
    _, reference = uninterrupted
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))  # each round once
    assert all(r["failed"] is None and r["clients_trained"] == 4 for r in summary["rounds"])
    # The rounds the killed process finished are its own, restored, not rerun.
    assert summary["rounds"][:killed.round] == killed.run_log["rounds"]
    assert summary["initial_accuracy"] == killed.run_log["initial_accuracy"]
    audit = run_cli_here("audit", str(out), "--json", env=env)  # (in this process: it starts no federation)
    assert audit.returncode == 0, audit.stdout[-3000:]
    report = json.loads(audit.stdout)
    assert report["ok"] and report["resumes"] == 1
    entries = verify_ledger(out).entries
    kinds = [e["kind"] for e in entries]
    assert kinds.count("run_start") == 1 and kinds.count("run_resume") == 1 and kinds.count("run_end") == 1
    # One user-level event per round: rounds are not counted twice.
    assert sorted(e["round"] for e in entries if e["kind"] == "user_level") == list(range(1, ROUNDS + 1))
    user = summary["privacy"]["user_level"]["epsilon"]
    assert user == pytest.approx(reference["privacy"]["user_level"]["epsilon"], rel=1e-9)
    return summary, entries


@pytest.mark.slow
def test_sigkill_between_rounds_then_resume_reaches_the_uninterrupted_epsilon(tmp_path, key_env, uninterrupted):
    out = tmp_path / "run"
    _killed_run(out, key_env, PAUSE_AFTER_ROUND, 2)
    summary, entries = _resume_and_check(out, key_env, uninterrupted)
    reference_entries, reference = uninterrupted
    for cid, eps in summary["privacy"]["record_level"]["clients"].items():
        spends = _spends(entries, cid)
        assert sorted(e["round"] for e in entries if e["actor"] == f"client:{cid}") == list(range(1, ROUNDS + 1))
        assert spends == _spends(reference_entries, cid)
        assert eps == pytest.approx(reference["privacy"]["record_level"]["clients"][cid], rel=1e-9)
        assert eps == pytest.approx(_rdp(spends), rel=1e-6)  # and what dp-accounting says


@pytest.mark.slow
def test_sigkill_inside_a_round_keeps_the_killed_attempts_spends(tmp_path, key_env, uninterrupted):
    """Killed after round 3's replies arrived (their spends are in the ledger) but before it was
    aggregated: the resume reruns round 3, and both attempts' spends count, because the server saw
    both updates. Epsilon is the uninterrupted run's plus exactly one round-3 spend per client."""
    out = tmp_path / "run"
    _killed_run(out, key_env, PAUSE_IN_ROUND, 3)
    summary, entries = _resume_and_check(out, key_env, uninterrupted)
    reference_entries, reference = uninterrupted
    for cid, eps in summary["privacy"]["record_level"]["clients"].items():
        rounds = sorted(e["round"] for e in entries if e["actor"] == f"client:{cid}")
        assert rounds == [1, 2, 3, 3, 4]
        spends = _spends(entries, cid)
        expected = _spends(reference_entries, cid)
        assert sorted(spends, key=str) == sorted(expected + [expected[2]], key=str)
        assert eps == pytest.approx(_rdp(spends), rel=1e-6)
        assert eps > reference["privacy"]["record_level"]["clients"][cid]
