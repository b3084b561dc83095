"""User-level spending composes across the runs of one server state (common/population.py).

The expected epsilons come from dp-accounting's RDP accountant directly, composing the events
the test itself describes.
"""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting import rdp

from fedpriv.common.audit import audit_run
from fedpriv.common.config import load_config
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LEDGER, verify_ledger
from fedpriv.server.privacy import PrivacyRecorder, UserBudgetExhausted

DELTA = 1e-5
# One round as the test records it: 2 of 10 clients expected, Poisson sampling, noise 1.5.
ROUND = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.5))


def _cfg(*extra):
    return load_config(overrides=[f"privacy.delta={DELTA}", "user_dp.enabled=true", "user_dp.noise_multiplier=1.5",
                                  *extra])


def _rounds(recorder, first, count):
    for r in range(first, first + count):
        recorder.record_user_round(r, population=10, expected=2.0, sampled=2, aggregated=2, noise_multiplier=1.5,
                                   mechanism={"noise_mode": "central"})


def _direct(rounds):
    accountant = rdp.RdpAccountant()
    accountant.compose(ROUND, rounds)
    return accountant.get_epsilon(DELTA)


def _summary(run, figures):
    (run / "summary.json").write_text(json.dumps({"privacy": {
        "record_level": {"clients": {}}, "user_level": {"epsilon": figures["user_level"]["rdp"]}}}))


def _run_start(run):
    return verify_ledger(run).entries[0]["parameters"]


def test_the_second_run_starts_from_the_first_runs_spend(own_server_state, tmp_path):
    first = PrivacyRecorder(_cfg(), tmp_path / "run1")
    assert _run_start(tmp_path / "run1")["composed_runs"] == []
    _rounds(first, 1, 2)
    figures1 = first.finish()
    _summary(tmp_path / "run1", figures1)
    assert figures1["user_level"]["rdp"] == pytest.approx(_direct(2), rel=1e-6)
    assert figures1["user_level_cumulative"]["rdp"] == pytest.approx(_direct(2), rel=1e-6)

    second = PrivacyRecorder(_cfg(), tmp_path / "run2")
    # its run_start names the earlier run it composed, at the head the audit can read again
    assert _run_start(tmp_path / "run2")["composed_runs"] == [
        {"run_id": first.run_id, "entries": first.ledger.seq, "head_hash": first.ledger.prev_hash,
         "user_level_rounds": 2}]
    assert second._cumulative_user_epsilon() == pytest.approx(_direct(2), rel=1e-6)
    _rounds(second, 1, 1)
    figures2 = second.finish()
    _summary(tmp_path / "run2", figures2)
    assert figures2["user_level"]["rdp"] == pytest.approx(_direct(1), rel=1e-6)  # this run alone
    assert figures2["user_level_cumulative"]["rdp"] == pytest.approx(_direct(3), rel=1e-6)  # with run 1
    assert figures2["composed_runs"] == [first.run_id]
    last_user_entry = [e for e in verify_ledger(tmp_path / "run2").entries if e["kind"] == "user_level"][-1]
    assert last_user_entry["epsilon"]["rdp_with_earlier_runs"] == pytest.approx(_direct(3), rel=1e-6)

    report = audit_run(tmp_path / "run2")  # reads the composed prefix of run 1's ledger again
    assert report["composed_runs"] == [first.run_id]
    assert report["user_level_cumulative"]["rdp"] == pytest.approx(_direct(3), rel=1e-6)
    assert report["epsilon"]["user_level"]["rdp"] == pytest.approx(_direct(1), rel=1e-6)
    assert report["ok"], report["failures"]
    from fedpriv.audit_cmd import markdown  # audit.md shows the composed figure beside this run's

    row = next(line for line in markdown(report).splitlines() if "earlier run(s) of this server state" in line)
    assert row.startswith("| user level, with the 1 earlier run(s)")
    assert float(row.split("|")[2]) == pytest.approx(_direct(3), rel=1e-3)


def test_the_second_run_refuses_a_round_past_the_composed_budget(own_server_state, tmp_path):
    first = PrivacyRecorder(_cfg(), tmp_path / "run1")
    _rounds(first, 1, 3)
    first.finish()
    budget = (_direct(4) + _direct(5)) / 2  # room for one more round in all, not for two
    assert _direct(2) < budget  # a fresh population would run both

    second = PrivacyRecorder(_cfg(f"privacy.user_budget={budget}"), tmp_path / "run2")
    second.check_user_budget(1, 10, 2.0)  # 4 rounds in all: within
    _rounds(second, 1, 1)
    with pytest.raises(UserBudgetExhausted, match="composed with 1 earlier run"):
        second.check_user_budget(2, 10, 2.0)  # 5 rounds in all: past it
    stop = verify_ledger(tmp_path / "run2").entries[-1]
    assert stop["kind"] == "budget_stop" and stop["epsilon"]["rdp"] == pytest.approx(_direct(4), rel=1e-6)


def test_another_state_is_another_population(own_server_state, tmp_path, monkeypatch):
    first = PrivacyRecorder(_cfg(), tmp_path / "run1")
    _rounds(first, 1, 3)
    first.finish()
    monkeypatch.setenv("FEDPRIV_LEDGER_WITNESS", str(tmp_path / "other-state" / "ledger-witness"))
    other = PrivacyRecorder(_cfg(f"privacy.user_budget={(_direct(4) + _direct(5)) / 2}"), tmp_path / "run2")
    assert _run_start(tmp_path / "run2")["composed_runs"] == []
    other.check_user_budget(1, 10, 2.0)
    _rounds(other, 1, 1)
    other.check_user_budget(2, 10, 2.0)


def test_an_unreadable_earlier_run_blocks_a_budgeted_run(own_server_state, tmp_path):
    first = PrivacyRecorder(_cfg(), tmp_path / "run1")
    _rounds(first, 1, 1)
    first.finish()
    lines = (tmp_path / "run1" / LEDGER).read_bytes().splitlines(keepends=True)
    (tmp_path / "run1" / LEDGER).write_bytes(b"".join(lines[:1]))  # its user-level round removed
    with pytest.raises(FedprivError, match=f"earlier run {first.run_id}.*cannot be read"):
        PrivacyRecorder(_cfg("privacy.user_budget=5"), tmp_path / "run2")
    # without a budget to enforce, the run starts and records what it could not compose
    PrivacyRecorder(_cfg(), tmp_path / "run3")
    start = _run_start(tmp_path / "run3")
    assert start["composed_runs"] == [] and [u["run_id"] for u in start["uncomposed_runs"]] == [first.run_id]
