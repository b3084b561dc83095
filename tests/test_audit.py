"""`fedpriv audit`: replays the ledger with dp-accounting and names every failure."""

import json

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedpriv.common.accounting import DPSGDSpend
from fedpriv.common.audit import audit_run
from fedpriv.common.config import load_config
from fedpriv.common.ledger import LEDGER
from fedpriv.cli import main
from fedpriv.server.privacy import PrivacyRecorder

# Every test its own server state: the user-level spending of other tests' runs (some tampered
# with on purpose) is not composed with these runs' (common/population.py).
pytestmark = pytest.mark.usefixtures("own_server_state")

DELTA = 1e-5
SPEND = DPSGDSpend(0.08, 1.2, 13)
PRIOR = DPSGDSpend(0.05, 1.0, 40)


def _make_run(run_dir, rounds=3, user_budget=0.0, record_budget=0.0):
    """A run's ledger as the server writes it: 2 clients (one with prior spending), user-level DP
    over a population of 10 with 5 sampled per round."""
    cfg = load_config(overrides=[
        f"privacy.delta={DELTA}", "user_dp.enabled=true", "user_dp.noise_multiplier=1.0",
        f"privacy.user_budget={user_budget}", f"privacy.record_budget={record_budget}",
    ])
    recorder = PrivacyRecorder(cfg, run_dir)
    for r in range(1, rounds + 1):
        for cid in ("0", "1"):
            privacy = {"round-spend": json.dumps(SPEND.to_json())}
            if cid == "1":  # clients repeat it in every reply; the server records it once
                privacy["prior-spends"] = json.dumps([PRIOR.to_json()])
            recorder.record_client(r, cid, recorder.parse_declaration(privacy))
        recorder.record_user_round(r, population=10, expected=5.0, sampled=5, aggregated=2,
                                   noise_multiplier=1.0, mechanism={"noise_mode": "central"})
    recorder.record_refusal(rounds, "node-x", "budget exhausted: test")
    figures = recorder.finish()
    summary = {"privacy": {"record_level": {"clients": {k: v["rdp"] for k, v in figures["record_level"].items()}},
                           "user_level": {"epsilon": figures["user_level"]["rdp"]}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def _direct(events, accountant, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    acc = (rdp.RdpAccountant(neighboring_relation=relation) if accountant == "rdp"
           else pld.PLDAccountant(relation, value_discretization_interval=1e-4))
    for event in events:
        acc.compose(event)
    return acc.get_epsilon(DELTA)


def test_clean_run_audits_and_matches_dp_accounting(tmp_path):
    report = audit_run(_make_run(tmp_path / "run"))
    assert report["ok"] and report["ledger_ok"] and report["budget_ok"] and report["consistent"]
    step = dp_accounting.PoissonSampledDpEvent(0.08, dp_accounting.GaussianDpEvent(1.2))
    client0 = [dp_accounting.SelfComposedDpEvent(step, 13 * 3)]
    client1 = client0 + [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 40)]
    eps = report["epsilon"]["record_level"]
    assert eps["0"]["rdp"] == pytest.approx(_direct(client0, "rdp"), rel=1e-6)
    assert eps["0"]["pld"] == pytest.approx(_direct(client0, "pld"), rel=1e-6)
    assert eps["1"]["rdp"] == pytest.approx(_direct(client1, "rdp"), rel=1e-6)  # prior spending carried
    user = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 3)]
    assert report["epsilon"]["user_level"]["rdp"] == pytest.approx(_direct(user, "rdp"), rel=1e-6)
    assert report["epsilon"]["user_level"]["pld"] == pytest.approx(_direct(user, "pld"), rel=1e-6)
    assert report["refusals"] == 1


def test_cli_json_and_files(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    assert main(["audit", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ledger_ok"] is True and report["budget_ok"] is True
    assert set(report["epsilon"]) == {"user_level", "record_level"}
    assert (run / "audit.md").read_text().startswith("# Privacy audit")
    assert (run / "audit.png").read_bytes()[:4] == b"\x89PNG"


def test_tampered_ledger_exits_non_zero(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    data = bytearray((run / LEDGER).read_bytes())
    data[len(data) // 2] ^= 0x04
    (run / LEDGER).write_bytes(bytes(data))
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "ledger line" in out


def test_wrong_recorded_epsilon_is_a_named_mismatch(tmp_path):
    """A writer that signs wrong numbers (a buggy or lying server) is caught by the replay."""
    cfg = load_config(overrides=[f"privacy.delta={DELTA}"])
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    recorder.record_client(1, "0", recorder.parse_declaration({"round-spend": json.dumps(SPEND.to_json())}))
    recorder.ledger.append(actor="client:0", kind="record_level", round=2, event=SPEND.to_event(),
                           parameters=SPEND.to_json(), sampling="poisson", epsilon={"rdp": 0.1})
    recorder.finish()
    report = audit_run(tmp_path / "run")
    assert report["ledger_ok"] and not report["consistent"] and not report["ok"]
    assert any("recorded epsilon 0.1" in f for f in report["failures"])


def test_budget_overrun_is_named(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    assert main(["audit", str(run), "--budget", "0.5"]) == 1
    report = audit_run(run, budget=0.5)
    assert not report["budget_ok"] and report["ledger_ok"]
    assert any("exceeds --budget 0.5" in f for f in report["failures"])
    # a recorded budget that was exceeded is caught as well
    over = _make_run(tmp_path / "over", record_budget=0.5)
    assert any("exceeds its record-level budget" in f for f in audit_run(over)["failures"])


def test_summary_that_disagrees_with_the_ledger(tmp_path):
    run = _make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["record_level"]["clients"]["0"] = 0.01
    (run / "summary.json").write_text(json.dumps(summary))
    report = audit_run(run)
    assert not report["consistent"] and any("summary.json reports" in f for f in report["failures"])


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "run directory not found"),
    (lambda p: p.mkdir(), "no privacy ledger"),
])
def test_bad_input(tmp_path, capsys, make, fragment):
    target = tmp_path / "missing"
    make(target)
    assert main(["audit", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err and "Traceback" not in err


def test_ledger_that_is_not_json(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    (run / LEDGER).write_text("garbage\n")
    assert main(["audit", str(run)]) == 1
    assert "ledger line 1 is not valid JSON" in capsys.readouterr().out


@pytest.mark.parametrize("privacy", [
    {"round-spend": "not json"},
    {"round-spend": json.dumps({"sampling_probability": 2.0, "noise_multiplier": 1.0, "steps": 3})},
    {"round-spend": json.dumps({"noise_multiplier": 1.0})},
    {"prior-spends": json.dumps([{"sampling_probability": 0.1, "noise_multiplier": -1, "steps": 3}])},
])
def test_malformed_declarations_are_rejected(privacy):
    with pytest.raises((ValueError, KeyError, TypeError)):
        PrivacyRecorder.parse_declaration(privacy)


# ---- the audit fails closed ------------------------------------------------------------------------
def test_an_unanalysable_event_fails_the_audit_by_name(tmp_path, capsys):
    """An event dp-accounting cannot analyse is a named failure (exit 1), never epsilon 0."""
    cfg = load_config(overrides=[f"privacy.delta={DELTA}", "user_dp.enabled=true", "privacy.user_budget=1.0"])
    run = tmp_path / "run"
    recorder = PrivacyRecorder(cfg, run)
    # Fixed-size sampling recorded under add/remove adjacency: RDP cannot analyse it.
    event = dp_accounting.SampledWithoutReplacementDpEvent(10, 5, dp_accounting.GaussianDpEvent(0.1))
    assert not rdp.RdpAccountant().supports(event)
    recorder.ledger.append(actor="server", kind="user_level", round=1, event=event, sampling="poisson",
                           epsilon={"rdp": 0.0})
    recorder.ledger.append(actor="server", kind="run_end",
                           epsilon={"record_level": {}, "user_level": {"rdp": None, "pld": None}})
    (run / "summary.json").write_text(json.dumps(
        {"privacy": {"record_level": {"clients": {}}, "user_level": {"epsilon": None}}}))

    assert main(["audit", str(run), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and not report["budget_ok"]
    named = [f for f in report["failures"] if "unanalysable event" in f]
    assert len(named) == 1 and "SampledWithoutReplacementDpEvent" in named[0], report["failures"]
    assert audit_run(run)["epsilon"]["user_level"]["rdp"] == float("inf")  # (JSON writes it as null)
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "unanalysable event" in out


# ---- budgets can only tighten ------------------------------------------------------------------------
def _resumed_run(run_dir, first_budgets: dict, resumed_budgets: dict):
    """Three rounds under ``first_budgets``, then a run_resume entry with ``resumed_budgets`` (as
    a ledger written by a server that did not refuse it would hold), and one more round."""
    def cfg(budgets):
        return load_config(overrides=[f"privacy.delta={DELTA}", "user_dp.enabled=true",
                                      *(f"privacy.{k}={v}" for k, v in budgets.items())])
    recorder = PrivacyRecorder(cfg(first_budgets), run_dir)

    def one_round(r):
        recorder.record_client(r, "0", recorder.parse_declaration({"round-spend": json.dumps(SPEND.to_json())}))
        recorder.record_user_round(r, population=10, expected=5.0, sampled=5, aggregated=2,
                                   noise_multiplier=1.0, mechanism={"noise_mode": "central"})
    for r in (1, 2, 3):
        one_round(r)
    recorder.ledger.append(actor="server", kind="run_resume", round=4,
                           parameters={"delta": DELTA, "run_id": recorder.run_id,
                                       **{k: v or None for k, v in resumed_budgets.items()}})
    recorder.cfg = cfg(resumed_budgets)
    one_round(4)
    recorder.finish()
    return run_dir


def test_a_budget_lifted_by_a_resume_stays_in_force_in_the_audit(tmp_path):
    """The user-level budget was exceeded before the resume lifted it: the audit checks the budget
    against the epsilon while it was in force, and names the relaxation."""
    run = _resumed_run(tmp_path / "run", {"user_budget": 0.5}, {"user_budget": 0})
    step = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    at_resume = _direct([dp_accounting.SelfComposedDpEvent(step, 3)], "rdp")
    assert at_resume > 0.5
    report = audit_run(run)
    assert not report["ok"] and not report["budget_ok"] and report["consistent"]
    assert any("relaxes privacy.user_budget from 0.5 to no limit" in f for f in report["failures"])
    over = [f for f in report["failures"] if f.startswith("user-level epsilon") and "0.5 (in force from ledger entry 0)" in f]
    assert len(over) == 1 and f"{at_resume:.4f}" in over[0], report["failures"]
    assert report["budgets"]["user_level"] == 0.5  # the strictest ever in force
    assert [b["user_level"] for b in report["budget_history"]] == [0.5, None]


MISSING_SUMMARY = ("summary.json is missing: the run's reported results cannot be checked against the ledger "
                   "(deleted, or the run did not finish)")


def test_the_final_epsilon_is_checked_against_the_strictest_budget(tmp_path):
    """A resume raised the record-level budget above what client 0 ends at: still a failure, as the
    first (stricter) budget stays in force."""
    step = dp_accounting.PoissonSampledDpEvent(0.08, dp_accounting.GaussianDpEvent(1.2))
    final = _direct([dp_accounting.SelfComposedDpEvent(step, 13 * 4)], "rdp")
    at_resume = _direct([dp_accounting.SelfComposedDpEvent(step, 13 * 3)], "rdp")
    strict = round((final + at_resume) / 2, 6)  # held until the resume, exceeded after it
    run = _resumed_run(tmp_path / "run", {"record_budget": strict}, {"record_budget": final * 2})
    report = audit_run(run)
    assert not report["budget_ok"]
    assert any(f"relaxes privacy.record_budget from {strict:g}" in f for f in report["failures"])
    assert any(f.startswith("client 0: record-level epsilon") and "the strictest" in f and f"{strict:g}" in f
               for f in report["failures"]), report["failures"]
    # Tightening is what a resume may do, and then the audit passes.
    tight = _resumed_run(tmp_path / "tight", {"record_budget": final * 3}, {"record_budget": final * 2})
    report = audit_run(tight)  # a ledger built here, without the summary.json a run writes
    assert report["budget_ok"] and report["failures"] == [MISSING_SUMMARY], report["failures"]
