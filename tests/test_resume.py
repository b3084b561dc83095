"""Resuming a run from its encrypted checkpoint: privacy loss carries on, nothing is counted twice."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Context, RecordDict

from fedpriv.clients.app import _prior_spending
from fedpriv.clients.budget import open_guard
from fedpriv.common import checkpoint
from fedpriv.common.accounting import DPSGDSpend, merge_spends, record_level_epsilon
from fedpriv.common.audit import audit_run
from fedpriv.common.checkpoint import CheckpointError
from fedpriv.common.config import load_config
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LEDGER, ledger_run_id, verify_ledger
from fedpriv.server import resume
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.resume import RestorePoint
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy
from tests.conftest import dp_sgd_epsilon, run_cli, run_cli_here, simulate_run

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_resume")

DELTA = 1e-5
SPEND = DPSGDSpend(0.08, 1.2, 13)
PRIOR = DPSGDSpend(0.05, 1.0, 40)


def _rdp(spends: list[DPSGDSpend]) -> float:
    return dp_sgd_epsilon(spends, DELTA)


# ---- the node: prior spending of a resumed run ---------------------------------------------------
def test_a_nodes_prior_spending_excludes_spends_of_the_current_run(tmp_path):
    old, untagged, current = DPSGDSpend(0.1, 1.0, 5), DPSGDSpend(0.2, 1.5, 7), DPSGDSpend(0.1, 1.0, 3)
    with open_guard(tmp_path, budget=0, delta=DELTA) as guard:
        guard.record(old, 1, "an-earlier-run")
        guard.record(untagged, 1)  # an older fedpriv's entry: no run id, so it counts as prior
        guard.record(current, 1, "this-run")
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with open_guard(tmp_path, budget=0, delta=DELTA) as guard:  # a restarted node, read from disk
        guard.record(current, 2, "this-run")
        prior = [DPSGDSpend.from_json(s) for s in json.loads(_prior_spending(context, guard, "this-run"))]
        assert prior == merge_spends([old, untagged])
        # The budget still covers every spend, the current run's included.
        assert guard.epsilon() == pytest.approx(record_level_epsilon([old, untagged, current, current], DELTA))
        # Another run declares this run's spends as prior too.
        other = json.loads(_prior_spending(context, guard, "a-later-run"))
        assert [DPSGDSpend.from_json(s) for s in other] == merge_spends([old, untagged, current, current])
    tags = [e["parameters"].get("run_id") for e in verify_ledger(tmp_path).entries]
    assert tags == ["an-earlier-run", None, "this-run", "this-run"]


# ---- the server: ledger, accounting state, checkpoint --------------------------------------------
def _cfg(*overrides: str):
    return load_config(overrides=[f"privacy.delta={DELTA}", "user_dp.enabled=true", *overrides])


def _declare(recorder: PrivacyRecorder, server_round: int, client_id: str, prior: bool = False) -> None:
    privacy = {"round-spend": json.dumps(SPEND.to_json())}
    if prior:
        privacy["prior-spends"] = json.dumps([PRIOR.to_json()])
    recorder.record_client(server_round, client_id, recorder.parse_declaration(privacy))


def _round(recorder: PrivacyRecorder, server_round: int) -> None:
    for client_id in ("0", "1"):
        _declare(recorder, server_round, client_id, prior=client_id == "1")
    recorder.record_user_round(server_round, population=10, expected=5.0, sampled=5, aggregated=2,
                               noise_multiplier=1.0, mechanism={"noise_mode": "central"})


def _point(recorder: PrivacyRecorder, server_round: int, **changes) -> RestorePoint:
    fields = dict(round=server_round, run_id=recorder.run_id, ledger_entries=recorder.ledger.seq,
                  ledger_head=recorder.ledger.prev_hash, weights=[np.zeros(3, np.float32)], optimizer={},
                  run_log=RunLog().state(), wall_time_s=1.0)
    return RestorePoint(**{**fields, **changes})


def test_a_resumed_recorder_keeps_every_spend_and_continues_the_ledger(tmp_path):
    run = tmp_path / "run"
    first = PrivacyRecorder(_cfg(), run)
    for r in (1, 2):
        _round(first, r)
    first.record_refusal(2, "node-x", "budget exhausted: test")
    point = _point(first, 2)  # the checkpoint of round 2...
    _declare(first, 3, "0")  # ...then client 0's spend of round 3 arrives and the server crashes

    second = PrivacyRecorder(_cfg(), run, resume=point)
    assert second.run_id == first.run_id
    assert len(second.client_events["0"]) == 3 and len(second.client_events["1"]) == 3  # 1: carried + 2
    assert second.carried == {"1"} and len(second.user_events) == 2
    assert second.refusals == [{"round": 2, "node": "node-x", "reason": "budget exhausted: test"}]
    for r in (3, 4):  # round 3 is run again: the crashed attempt's spend stays counted
        _round(second, r)
    figures = second.finish()

    entries = verify_ledger(run).entries
    kinds = [e["kind"] for e in entries]
    assert kinds.count("run_start") == 1 and kinds.count("run_resume") == 1
    assert kinds.count("record_level_carried") == 1  # client 1's prior spending, carried once
    (marker,) = [e for e in entries if e["kind"] == "run_resume"]
    assert marker["round"] == 3 and marker["parameters"]["checkpoint_round"] == 2
    assert marker["parameters"]["run_id"] == first.run_id
    assert figures["record_level"]["0"]["rdp"] == pytest.approx(_rdp([SPEND] * 5), rel=1e-6)
    assert figures["record_level"]["1"]["rdp"] == pytest.approx(_rdp([SPEND] * 4 + [PRIOR]), rel=1e-6)
    report = audit_run(run)
    # (no summary.json: this test builds the ledger only, and the audit names its absence)
    assert report["ledger_ok"] and report["consistent"] and report["budget_ok"], report["failures"]
    assert [f for f in report["failures"] if not f.startswith("summary.json is missing")] == []
    assert report["resumes"] == 1 and report["refusals"] == 1


def test_a_resume_that_does_not_fit_the_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _round(recorder, 1)
    point = _point(recorder, 1)
    recorder.finish()
    before = (run / LEDGER).read_bytes()
    cases = [
        (_cfg("privacy.delta=1e-6"), point, "accounted at delta 1e-05"),
        (_cfg("run.seed=7"), point, "cannot change run.seed"),
        (_cfg(), _point(recorder, 1, ledger_head="0" * 64), "does not belong to the ledger"),
        (_cfg(), _point(recorder, 1, ledger_entries=999), "does not belong to the ledger"),
        (_cfg(), _point(recorder, 1, run_id="another"), "belongs to another run"),
        (_cfg(), None, "already holds a run"),  # a fresh start over an existing run
    ]
    for cfg, restore, message in cases:
        with pytest.raises(FedprivError, match=message):
            PrivacyRecorder(cfg, run, resume=restore)
        assert (run / LEDGER).read_bytes() == before


def test_a_resume_can_tighten_budgets_but_never_relax_them(tmp_path, own_server_state):
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg("privacy.record_budget=5", "privacy.user_budget=3"), run)
    _round(recorder, 1)
    point = _point(recorder, 1)
    recorder.finish()
    before = (run / LEDGER).read_bytes()
    relaxing = [
        ("privacy.record_budget=6", "cannot relax privacy.record_budget: the run has had 5 in force"),
        ("privacy.record_budget=0", "the configuration sets 0 (no limit)"),
        ("privacy.user_budget=3.5", "cannot relax privacy.user_budget: the run has had 3 in force"),
        ("privacy.user_budget=0", "cannot relax privacy.user_budget"),
    ]
    for setting, message in relaxing:
        with pytest.raises(FedprivError, match=re.escape(message)):
            PrivacyRecorder(_cfg("privacy.record_budget=5", "privacy.user_budget=3", setting), run, resume=point)
        assert (run / LEDGER).read_bytes() == before  # refused before anything was recorded
    # Tightening is allowed; afterwards the tighter budget is the one that cannot be relaxed.
    tighter = PrivacyRecorder(_cfg("privacy.record_budget=4", "privacy.user_budget=3"), run, resume=point)
    _round(tighter, 2)
    point = _point(tighter, 2)
    tighter.finish()
    before = (run / LEDGER).read_bytes()
    with pytest.raises(FedprivError, match="the run has had 4 in force, the configuration sets 4.5"):
        PrivacyRecorder(_cfg("privacy.record_budget=4.5", "privacy.user_budget=3"), run, resume=point)
    assert (run / LEDGER).read_bytes() == before


def test_simulate_resume_that_relaxes_a_budget_is_one_error_line(tmp_path, capsys):
    """``fedpriv simulate --resume`` refuses it before anything starts: exit 2, one error line."""
    from fedpriv.cli import main

    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg("privacy.record_budget=5"), run)
    _round(recorder, 1)
    recorder.finish()
    before = sorted((p.name, p.read_bytes()) for p in run.iterdir())
    for setting in ("privacy.record_budget=7", "privacy.record_budget=0"):
        code = main(["simulate", "--resume", str(run), "--set", setting, "--set", "run.rounds=3"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("error:") and "cannot relax privacy.record_budget" in err[0], err
        assert sorted((p.name, p.read_bytes()) for p in run.iterdir()) == before


def test_server_run_and_simulate_resume_resolve_one_configuration(tmp_path):
    """``--resume`` means one thing for both commands (common.settings.resolve_config): the run's
    recorded configuration (not a preset's), then --set, with run.resume on and run.out_dir the run;
    a preset beside it and a relaxed budget are refused by both with one error line."""
    import shlex

    from fedpriv.common.settings import resolve_config
    from tests.conftest import run_cli_here

    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg("dp.noise_multiplier=1.7", "privacy.record_budget=5", "run.rounds=2"), run)
    _round(recorder, 1)
    recorder.finish()
    cfg = resolve_config(None, None, ["run.rounds=3"], resume=run)
    assert cfg.dp.noise_multiplier == 1.7 and cfg.privacy.record_budget == 5 and cfg.run.rounds == 3
    assert cfg.run.resume is True and cfg.run.out_dir == str(run.resolve())

    keys = tmp_path / "keys"
    assert run_cli_here("keys", "--out", str(keys), "--app-key-only").returncode == 0
    app_key = next(keys.glob("app-signing*.key"))
    server = ["server", "run", "--state", str(tmp_path / "state"), "--app-key", str(app_key), "--dry-run"]
    proc = run_cli_here(*server, "--resume", str(run), "--set", "run.rounds=3")
    assert proc.returncode == 0, proc.stderr
    command = shlex.split(proc.stdout.strip().splitlines()[-1])
    submitted = dict(item.split("=", 1) for item in shlex.split(command[command.index("--run-config") + 1]))
    assert submitted["dp.noise_multiplier"] == "1.7" and submitted["run.rounds"] == "3"
    assert submitted["run.resume"] == "true" and submitted["run.out_dir"] == str(run.resolve())

    for args in (["--preset", "federation"], ["--set", "privacy.record_budget=6"]):
        for cli in (["simulate"], server):
            proc = run_cli_here(*cli, "--resume", str(run), *args)
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), (cli, args, err)
            assert ("drop --preset" if "--preset" in args else "cannot relax privacy.record_budget") in err[0]


def test_audit_requires_a_resume_at_the_runs_delta(tmp_path):
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _round(recorder, 1)
    recorder.ledger.append(actor="server", kind="run_resume", round=2,
                           parameters={"delta": 1e-3, "run_id": recorder.run_id})
    _round(recorder, 2)
    recorder.finish()
    report = audit_run(run)
    assert report["ledger_ok"] and not report["ok"]
    assert any("resumed at delta 0.001, not at the run's delta 1e-05" in f for f in report["failures"])


def test_checkpoint_state_round_trip_and_model_check(tmp_path, monkeypatch):
    key = checkpoint.new_key()
    run_log = RunLog()
    run_log.record_evaluation(0, 0.1, 2.3, None)
    run_log.record_train(1, [{"client-id": 0, "record-epsilon": 0.7}], [])
    run_log.record_evaluation(1, 0.5, 1.2, 3.0)
    run_log.record_round_failure(2, "secure aggregation halted")
    weights = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]
    moments = {"m_t": [w * 0.1 for w in weights], "v_t": [w * 0.2 for w in weights]}
    resume.save(tmp_path / checkpoint.CHECKPOINT, key, server_round=2, run="t", run_id="rid", ledger_entries=5,
                ledger_head="ab", weights=weights, optimizer=moments, run_log=run_log.state(), wall_time_s=9.5)
    point = resume.read(tmp_path, key)
    assert point.round == 2 and point.run_id == "rid" and point.wall_time_s == 9.5
    assert all(np.array_equal(a, b) for a, b in zip(point.weights, weights, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(point.optimizer["v_t"], moments["v_t"], strict=True))
    restored = RunLog()
    restored.restore(point.run_log)
    assert restored.state() == run_log.state()
    resume.check_model(point, weights, tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        resume.check_model(point, [np.ones((3, 2), np.float32), np.zeros(3, np.float32)], tmp_path)
    # The checkpoints of earlier versions (no run state) are refused by name.
    checkpoint.write_checkpoint(tmp_path / checkpoint.CHECKPOINT, weights, {"round": 2}, key, run_id="rid")
    with pytest.raises(CheckpointError, match="no resumable run state"):
        resume.read(tmp_path, key)
    monkeypatch.delenv(checkpoint.KEY_ENV, raising=False)
    monkeypatch.delenv(checkpoint.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("FEDPRIV_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="resuming needs the key"):
        resume.require_key()
    # The default key fedpriv simulate creates is the one a resume then finds.
    created = checkpoint.ensure_key()
    assert checkpoint.default_key_path().stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv(checkpoint.KEY_FILE_ENV)
    assert resume.require_key() == created


class _Message:
    def __init__(self, group_id: str) -> None:
        self.metadata = type("Metadata", (), {"group_id": group_id})()


def test_the_strategy_shifts_flowers_rounds_by_the_offset(tmp_path):
    cfg = _cfg("federation.strategy=fedadam")
    weights = [np.zeros((2, 2), np.float32)]
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    seen = []
    strategy = FedprivStrategy(cfg, weights, RunLog(), recorder, lambda r, w: seen.append(r) or (0.0, 0.0))
    strategy.round_offset = 3
    assert strategy.message_round(_Message("1")) == 4 and strategy.message_round(_Message("x")) is None
    assert strategy.fedpriv_round(0) == 0  # Flower's initial evaluation stays round 0
    strategy.evaluate(0, None)
    assert strategy.evaluate(2, None) is None and seen == [0]  # round 5 was never planned
    strategy.inner.m_t, strategy.inner.v_t = [np.ones((2, 2))], [np.full((2, 2), 2.0)]
    state = strategy.optimizer_state()
    fresh = FedprivStrategy(cfg, weights, RunLog(), recorder, lambda r, w: (0.0, 0.0))
    assert fresh.optimizer_state() == {}
    fresh.restore_optimizer(state)
    assert np.array_equal(fresh.inner.v_t[0], state["v_t"][0])


# ---- end to end: a server restart in the middle of a run -----------------------------------------
# The small MLP on scikit-learn's digits: what is tested is the restart, not the model.
SMALL = [
    "data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", "federation.num_clients=4",
    "federation.min_available_clients=4", "run.rounds=2",
    "client.local_epochs=1", "client.batch_size=64", "secure_aggregation.num_shares=3",
    "secure_aggregation.reconstruction_threshold=2", "user_dp.enabled=true",
]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """A finished 2-round run with encrypted checkpoints, and the environment holding its key."""
    env = {**os.environ, checkpoint.KEY_ENV: base64.b64encode(checkpoint.new_key()).decode()}
    out = tmp_path_factory.mktemp("resume") / "run"
    proc, summary = simulate_run(out, SMALL, env=env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, env, summary


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _expected(entries: list[dict], kind: str, actor: str) -> list[dict]:
    return [e["parameters"] for e in entries if e["kind"] == kind and e["actor"] == actor]


@pytest.mark.slow
def test_resume_after_a_server_restart_continues_epsilon(two_rounds, tmp_path):
    original, env, first = two_rounds
    run = _copy(original, tmp_path)
    # (in this process: what the resume needs is on disk; the resumes after SIGKILL, in
    # tests/test_kill_resume.py, find nothing of the first process left)
    proc, summary = simulate_run(run, ["run.rounds=4"], env=env, resume=True, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rounds 3-4 (resuming after round 2)" in proc.stdout and "round 4/4" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    assert summary["rounds"][:2] == first["rounds"]  # the restored history, as the first process left it
    assert summary["initial_accuracy"] == first["initial_accuracy"]
    assert all(r["clients_trained"] == 4 for r in summary["rounds"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in rows[1:]] == [1, 2, 3, 4]

    entries = verify_ledger(run).entries
    kinds = [e["kind"] for e in entries]
    assert kinds.count("run_start") == 1 and kinds.count("run_resume") == 1
    assert "record_level_carried" not in kinds  # no in-run spend came back as "prior"
    run_id = entries[0]["parameters"]["run_id"]
    privacy = summary["privacy"]
    clients = privacy["record_level"]["clients"]
    assert sorted(clients) == ["0", "1", "2", "3"]
    for cid, eps in clients.items():
        spends = _expected(entries, "record_level", f"client:{cid}")
        assert sorted(e["round"] for e in entries if e["actor"] == f"client:{cid}") == [1, 2, 3, 4]
        assert eps == pytest.approx(_rdp([DPSGDSpend.from_json(s) for s in spends]), rel=1e-6)
        assert eps > first["privacy"]["record_level"]["clients"][cid]
        # The node's own ledger holds the same four spends, each tagged with the run's id.
        node = verify_ledger(run / "nodes" / f"sim-{cid}").entries
        assert [e["parameters"]["run_id"] for e in node] == [run_id] * 4
        assert [DPSGDSpend.from_json(e["parameters"]) for e in node] == [DPSGDSpend.from_json(s) for s in spends]
    # User-level DP continues as well: every round's event, both processes.
    accountant = rdp.RdpAccountant()
    for p in _expected(entries, "user_level", "server"):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            p["sampling_probability"], dp_accounting.GaussianDpEvent(p["noise_multiplier"])))
    assert len(_expected(entries, "user_level", "server")) == 4
    assert privacy["user_level"]["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    assert privacy["user_level"]["epsilon"] > first["privacy"]["user_level"]["epsilon"]

    _, header = checkpoint.read_checkpoint(run / checkpoint.CHECKPOINT,
                                           base64.b64decode(env[checkpoint.KEY_ENV]))
    assert header["round"] == 4 and header["run_id"] == run_id
    audit = run_cli_here("audit", str(run), "--json")  # (in this process: it starts no federation)
    assert audit.returncode == 0, audit.stdout[-2000:]
    report = json.loads(audit.stdout)
    assert report["resumes"] == 1
    for cid, eps in clients.items():
        assert report["epsilon"]["record_level"][cid]["rdp"] == pytest.approx(eps, rel=1e-6)


@pytest.mark.slow
def test_resume_refusals_leave_the_run_untouched(two_rounds, tmp_path):
    original, env, _ = two_rounds
    run = _copy(original, tmp_path)
    without_key = {k: v for k, v in env.items() if k not in (checkpoint.KEY_ENV, checkpoint.KEY_FILE_ENV)}
    without_key["FEDPRIV_HOME"] = str(tmp_path / "no-keys-here")  # no default checkpoint key either
    wrong_key = {**env, checkpoint.KEY_ENV: base64.b64encode(checkpoint.new_key()).decode()}
    sealed = run / checkpoint.CHECKPOINT
    flipped = bytearray(sealed.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    cases = [
        (without_key, None, "resuming needs the key"),
        (wrong_key, None, "failed authentication: it was altered, or the key is wrong"),
        (env, bytes(flipped), "failed authentication: it was altered, or the key is wrong"),
    ]
    for i, (case_env, checkpoint_bytes, message) in enumerate(cases):
        if checkpoint_bytes is not None:
            sealed.write_bytes(checkpoint_bytes)
        ledger, sealed_bytes = (run / LEDGER).read_bytes(), sealed.read_bytes()
        # Refused before any federation starts, so in this process; the wrong key once in a fresh
        # interpreter as well (after importing the stack, its one line is still the only one).
        runner = run_cli if i == 1 else run_cli_here
        proc = runner("simulate", "--resume", str(run), "--set", "run.rounds=4", env=case_env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
        assert (run / LEDGER).read_bytes() == ledger and sealed.read_bytes() == sealed_bytes
    # A run already at run.rounds has nothing left: said plainly, exit 0, nothing changed.
    run = _copy(original, tmp_path / "done")
    ledger = (run / LEDGER).read_bytes()
    proc = run_cli_here("simulate", "--resume", str(run), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing left to resume" in proc.stdout and (run / LEDGER).read_bytes() == ledger


@pytest.mark.slow
def test_missing_partial_or_older_run_directories_are_one_clear_error(two_rounds, tmp_path):
    """Resuming what is not a complete run of this fedpriv: one error line, exit 2, nothing changed."""
    original, env, _ = two_rounds
    key = base64.b64decode(env[checkpoint.KEY_ENV])
    partial = _copy(original, tmp_path / "partial")
    (partial / checkpoint.CHECKPOINT).unlink()
    older = _copy(original, tmp_path / "older")  # a checkpoint without the state a resume needs
    run_id = ledger_run_id(verify_ledger(original).entries)
    checkpoint.write_checkpoint(older / checkpoint.CHECKPOINT, [np.zeros(3)], {"round": 2}, key, run_id=run_id)
    # Sealed files moved between runs or roles: another run's checkpoint, the run's own model.
    foreign = _copy(original, tmp_path / "foreign")
    checkpoint.write_checkpoint(foreign / checkpoint.CHECKPOINT, [np.zeros(3)], {"round": 2}, key, run_id="f" * 32)
    role = _copy(original, tmp_path / "role")
    shutil.copy(original / "model.sealed", role / checkpoint.CHECKPOINT)
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "missing", "not a directory"),
        (tmp_path / "empty", "no ledger.jsonl"),
        (partial, "no checkpoint in"),
        (older, "holds no resumable run state (written by an older fedpriv?)"),
        (foreign, f"was sealed for run {'f' * 32}, not for this run ({run_id})"),
        (role, "is a sealed model, not a checkpoint"),
    ]
    for run, message in cases:
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} if run.is_dir() else None
        proc = run_cli_here("simulate", "--resume", str(run), "--set", "run.rounds=4", env=env)  # refused first
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (message, proc.stderr)
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} if run.is_dir() else None
        assert after == before
