"""Empirical privacy audit: the one-run lower bound, the canaries, and ``fedpriv audit --empirical``.

The bound's tests use scipy (a development dependency) and brute-force enumeration as references;
the library computes binomial tails itself. The end-to-end tests (marked slow) show the three
acceptance properties on the built-in data: power (no DP: a lower bound of at least 1),
consistency (an honest DP run: a lower bound at or below its accounted epsilon) and detection (the
same run with the noise switched off by the test harness's noiseless trainer (tests/injected.py)
while its ledger still claims it: a VIOLATION).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from flwr.app import Context, RecordDict

from fedpriv.clients.app import local_data, node_setup
from fedpriv.clients.trainer import LocalTrainer
from fedpriv.common import empirical
from fedpriv.common.canaries import Canaries
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.cli import main
from fedpriv.common.fileio import write_json
from fedpriv.common.rundir import SUMMARY
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.report import build_summary
from fedpriv.server.run_log import RunLog
from fedpriv.common.presets import preset_layers
from tests import injected
from tests.conftest import run_cli_here
from tests.injected import NoiselessTrainer


def _accuracy(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


def _reference_p_value(m, r, v, eps, delta):
    """The bound written out directly from its statement, with scipy's binomial."""
    q = _accuracy(eps)
    tail = scipy.stats.binom.sf(v - 1, r, q)
    pmf = scipy.stats.binom.pmf(np.arange(r + 1), r, q)
    alpha = max((math.fsum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + alpha * 2 * m * delta, 1.0)


# ---- the bound ---------------------------------------------------------------------------------
@pytest.mark.parametrize("r,q", [(1, 0.3), (10, 0.5), (100, 0.73), (1000, 0.9), (1000, 1e-6), (7, 1.0), (7, 0.0)])
def test_binomial_pmf_matches_scipy(r, q):
    np.testing.assert_allclose(empirical.binomial_pmf(r, q), scipy.stats.binom.pmf(np.arange(r + 1), r, q),
                               rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("m,r,v", [(10, 10, 7), (100, 60, 50), (1000, 200, 180), (1000, 1000, 560), (50, 20, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_the_stated_bound(m, r, v, eps, delta):
    assert empirical.p_value(m, r, v, eps, delta) == pytest.approx(_reference_p_value(m, r, v, eps, delta),
                                                                   rel=1e-9, abs=1e-15)


def test_without_delta_the_p_value_is_the_binomial_tail():
    for r, v, eps in [(100, 80, 1.0), (1000, 700, 0.5), (20, 20, 3.0)]:
        assert empirical.p_value(r, r, v, eps, 0.0) == pytest.approx(
            scipy.stats.binom.sf(v - 1, r, _accuracy(eps)), rel=1e-10)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_all_guesses_right_matches_the_pure_dp_closed_form(r, confidence):
    # With delta = 0 and v = r the p-value is q^r, so the bound solves q^r = 1 - confidence.
    q = (1 - confidence) ** (1 / r)
    closed_form = max(0.0, math.log(q / (1 - q)))  # one guess rules nothing out
    assert empirical.epsilon_lower_bound(r, r, r, 0.0, confidence) == pytest.approx(closed_form, rel=1e-9)


def test_known_binomial_cases():
    # r = v = 100 at 95%: q = 0.05^(1/100), epsilon = log(q / (1 - q)) = 3.4930
    assert empirical.epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(3.49297, abs=1e-4)
    # no better than chance: nothing is ruled out
    assert empirical.epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert empirical.epsilon_lower_bound(1000, 100, 50, 0.0) == 0.0
    assert empirical.epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    # 80 of 100 right: the bound is the root of p_value(eps) = 0.05 (found here by scipy's brentq)
    for delta in (0.0, 1e-5, 1e-4):
        root = scipy.optimize.brentq(lambda e: _reference_p_value(1000, 100, 80, e, delta) - 0.05, 0, 5, xtol=1e-12)
        assert empirical.epsilon_lower_bound(1000, 100, 80, delta) == pytest.approx(root, abs=1e-7)


def test_the_bound_is_monotone():
    by_correct = [empirical.epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    assert by_correct == sorted(by_correct) and by_correct[-1] > 3
    by_delta = [empirical.epsilon_lower_bound(1000, 200, 180, d) for d in (0, 1e-6, 1e-5, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]
    by_confidence = [empirical.epsilon_lower_bound(1000, 200, 180, 1e-5, c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert by_confidence == sorted(by_confidence, reverse=True)
    by_canaries = [empirical.epsilon_lower_bound(m, 200, 180, 1e-4) for m in (200, 1000, 5000)]
    assert by_canaries == sorted(by_canaries, reverse=True)  # the delta term grows with m
    p = [empirical.p_value(1000, 200, 150, e, 1e-5) for e in np.linspace(0, 4, 41)]
    assert all(a <= b + 1e-12 for a, b in zip(p, p[1:]))  # (up to rounding where it reaches 1)


def _randomized_response_tail(r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] against the worst (eps, delta)-DP mechanism family, by
    enumerating every outcome: each canary's bit is revealed with probability delta, else sent
    through eps-randomized response, and the auditor guesses what it sees."""
    q = _accuracy(eps)
    outcomes = ((delta, 1), ((1 - delta) * q, 1), ((1 - delta) * (1 - q), 0))
    total = 0.0
    for pattern in itertools.product(outcomes, repeat=r):
        if sum(c for _, c in pattern) >= v:
            total += math.prod(p for p, _ in pattern)
    return total


@pytest.mark.parametrize("m", [3, 5, 7])
def test_brute_force_on_small_m(m):
    for r in range(1, m + 1):
        for v in range(r + 1):
            for eps in (0.0, 0.5, 1.0, 2.0):
                # delta = 0: randomized response is the worst case, and the bound is exact
                exact = _randomized_response_tail(r, v, eps, 0.0)
                assert empirical.p_value(m, r, v, eps, 0.0) == pytest.approx(exact, rel=1e-9, abs=1e-15)
                # delta > 0: the bound still covers the mechanism that leaks with probability delta
                for delta in (1e-3, 0.02, 0.1):
                    assert _randomized_response_tail(r, v, eps, delta) <= empirical.p_value(m, r, v, eps, delta) + 1e-12
    # and the lower bound is where the brute-force tail crosses 1 - confidence
    for r, v in ((m, m), (m, m - 1)):
        if _randomized_response_tail(r, v, 0.0, 0.0) >= 0.05:  # as likely as that by chance alone
            assert empirical.epsilon_lower_bound(m, r, v, 0.0) == 0.0
            continue
        brute = scipy.optimize.brentq(lambda e: _randomized_response_tail(r, v, e, 0.0) - 0.05, 0, 20, xtol=1e-12)
        assert empirical.epsilon_lower_bound(m, r, v, 0.0) == pytest.approx(brute, abs=1e-7)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        empirical.p_value(10, 11, 3, 1.0, 0.0)
    with pytest.raises(ValueError):
        empirical.p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError):
        empirical.epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)


# ---- guesses from scores -----------------------------------------------------------------------
def test_guess_plans_are_fixed_and_fit():
    for m in (2, 5, 100, 1000):
        plans = empirical.guess_plans(m)
        assert len(plans) == len(set(plans)) and all(0 < a + b <= m for a, b in plans)
        assert (m, 0) in plans
    assert empirical.guess_plans(1000) == empirical.guess_plans(1000)


def test_one_run_audit_separated_random_and_bonferroni():
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    perfect = empirical.one_run_audit(included.astype(float), included, 1e-5)
    plans = len(empirical.guess_plans(1000))
    assert perfect["plans_tried"] == plans
    assert perfect["confidence_per_plan"] == pytest.approx(1 - 0.05 / plans)
    assert perfect["guesses"] - perfect["correct"] <= abs(int(included.sum()) - 500)  # wrong only past the split
    assert perfect["epsilon_lower_bound"] == pytest.approx(empirical.epsilon_lower_bound(
        1000, perfect["guesses"], perfect["correct"], 1e-5, 1 - 0.05 / plans))
    assert perfect["epsilon_lower_bound"] > 4
    chance = empirical.one_run_audit(rng.random(1000), included, 1e-5)
    assert chance["epsilon_lower_bound"] < 0.5
    # the best plan's counts are its guesses: the top scores "in", the bottom scores "out"
    noisy = included + rng.normal(0, 0.8, 1000)
    result = empirical.one_run_audit(noisy, included, 1e-5)
    ranked = included[np.argsort(-noisy, kind="stable")]

    def correct(k_in, k_out):
        return int(ranked[:k_in].sum() + (~ranked[1000 - k_out:]).sum())

    assert result["correct"] == correct(result["guesses_in"], result["guesses_out"])
    assert result["epsilon_lower_bound"] == max(
        empirical.epsilon_lower_bound(1000, a + b, correct(a, b), 1e-5, result["confidence_per_plan"])
        for a, b in empirical.guess_plans(1000))
    assert 0 < result["epsilon_lower_bound"] < perfect["epsilon_lower_bound"]


def test_membership_inference_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    members, nonmembers = rng.exponential(0.5, 4000), rng.exponential(1.0, 1000)
    result = empirical.membership_inference(members, nonmembers)
    labels = np.r_[np.ones(4000), np.zeros(1000)]
    assert result["auc"] == pytest.approx(roc_auc_score(labels, -np.r_[members, nonmembers]))
    assert 0.6 < result["auc"] < 0.75 and set(result["tpr_at_fpr"]) == {"0.001", "0.01"}
    assert 0 <= result["tpr_at_fpr"]["0.001"] <= result["tpr_at_fpr"]["0.01"] <= 1
    separated = empirical.membership_inference(np.zeros(10), np.ones(10))
    assert separated["auc"] == 1.0 and separated["tpr_at_fpr"]["0.001"] == 1.0


# ---- canaries and where they go ----------------------------------------------------------------
def test_canaries_are_reproducible_out_of_distribution_and_dealt_once():
    cfg = load_config(overrides=["federation.num_clients=4", "federation.min_available_clients=4"])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    canaries = Canaries(seed=11, count=1000)
    x, y = canaries.records(cfg.data, cfg.run.seed)
    assert x.shape == (1000, *dataset.input_shape) and x.dtype == dataset.x_train.dtype
    assert set(np.unique(x)) <= {0.0, 1.0} and 0.15 < x.mean() < 0.25
    assert set(np.unique(y)) == set(range(dataset.num_classes))
    again = Canaries(seed=11, count=1000)
    np.testing.assert_array_equal(again.records(cfg.data, cfg.run.seed)[0], x)
    np.testing.assert_array_equal(again.included(), canaries.included())
    assert 430 < canaries.included().sum() < 570
    assert not np.array_equal(Canaries(seed=12, count=1000).included(), canaries.included())
    shares = [canaries.for_client(cfg.data, cfg.run.seed, 4, c) for c in range(4)]
    assert sum(len(s[1]) for s in shares) == canaries.included().sum()
    np.testing.assert_array_equal(shares[1][0], x[canaries.included() & (np.arange(1000) % 4 == 1)])


def test_a_simulated_node_trains_on_its_partition_plus_its_canaries():
    cfg = load_config(overrides=["data.dataset=digits", "federation.num_clients=3",
                                 "federation.min_available_clients=3"])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 3},
                      state=RecordDict(), run_config=cfg.to_flat())
    canaries = Canaries(seed=5, count=90)
    plain = node_setup(context, cfg, dataset)
    node = node_setup(context, cfg, dataset, canaries)
    extra_x, extra_y = canaries.for_client(cfg.data, cfg.run.seed, 3, 1)
    assert len(plain.y) == len(local_data(cfg, 1)[1]) and len(node.y) == len(plain.y) + len(extra_y) > len(plain.y)
    np.testing.assert_array_equal(node.x[len(plain.y):], extra_x)
    np.testing.assert_array_equal(node.y[len(plain.y):], extra_y)


@pytest.mark.parametrize("implementation", ["auto", "fast", "vectorized"])
def test_the_noiseless_test_trainer_removes_noise_but_keeps_the_claim(caplog, implementation):
    cfg = load_config(overrides=["data.dataset=digits", "model.name=mlp", "model.mlp_units=8",
                                 "dp.noise_multiplier=1.3", "client.batch_size=64",
                                 f"dp.implementation={implementation}"])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    x, y = dataset.x_train[:40], dataset.y_train[:40]  # batch 64 > 40 records: every step takes all
    args = ("mlp", cfg.model, cfg.client, cfg.dp, dataset.input_shape, dataset.num_classes)
    honest = LocalTrainer(*args)
    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        broken = NoiselessTrainer(*args)
    assert "tests.injected" in caplog.text and "noise is OFF" in caplog.text
    assert honest.applied_noise_multiplier == 1.3 and broken.applied_noise_multiplier == 0.0
    assert broken.planned_spend(40) == honest.planned_spend(40)  # the claim is unchanged
    assert broken.planned_spend(40).noise_multiplier == 1.3
    start = [np.asarray(w) for w in honest.model.get_weights()]
    # Without noise (and with the whole data in every batch) training is deterministic.
    first, second = broken.train(start, x, y, 40).weights, broken.train(start, x, y, 40).weights
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(first, second))
    first, second = honest.train(start, x, y, 40).weights, honest.train(start, x, y, 40).weights
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(first, second))


# ---- the command's input checks (no training) ----------------------------------------------
def _ledger_only_run(run_dir):
    cfg = load_config(overrides=["federation.num_clients=4", "federation.min_available_clients=4"])
    PrivacyRecorder(cfg, run_dir).finish()
    return run_dir


def test_bad_input_is_one_line(tmp_path, capsys):
    run = _ledger_only_run(tmp_path / "run")
    for argv, message in [
        (["audit", str(tmp_path / "missing"), "--empirical"], "run directory not found"),
        (["audit", str(run), "--canaries", "10"], "--canaries only apply with --empirical"),
        (["audit", str(run), "--empirical", "--canaries", "1"], "--canaries must be between 2"),
        (["audit", str(run), "--empirical", "--confidence", "1.5"], "--confidence must be between 0 and 1"),
        (["audit", str(run), "--empirical", "--rounds", "0"], "--rounds must be at least 1"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_an_unverified_ledger_is_not_audited_empirically(tmp_path, capsys):
    run = _ledger_only_run(tmp_path / "run")
    lines = (run / "ledger.jsonl").read_text().splitlines()
    (run / "ledger.jsonl").write_text("\n".join(lines[:-1] + [lines[-1].replace('"run_end"', '"run_enD"')]) + "\n")
    assert main(["audit", str(run), "--empirical", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["empirical"]["skipped"].startswith("the ledger does not verify")
    assert "## Empirical audit" in (run / "audit.md").read_text()


# ---- end to end on the built-in data -----------------------------------------------------------
SMALL = ["federation.num_clients=4", "federation.min_available_clients=4", "run.rounds=6",
         "secure_aggregation.enabled=false"]
# Accounted record-level epsilon about 0.3 (RDP 0.32, PLD 0.29 at delta 1e-5); clipping at 30, so
# that a run without its noise trains almost as one without DP does.
SMALL_DP = [*SMALL, "dp.l2_norm_clip=30", "dp.noise_multiplier=5"]


def _fingerprint(run_dir):
    """The run's own files (None for one it lacks: a built ledger has no model.sealed)."""
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() if (run_dir / name).exists() else None
            for name in ("ledger.jsonl", "ledger.head.json", "summary.json", "model.sealed")}


def _ledger_of(cfg, run_dir):
    """The ledger the server writes for ``cfg`` (no rounds trained), and the summary.json every
    finished run has beside it (the audit names a missing one)."""
    recorder = PrivacyRecorder(cfg, run_dir)
    write_json(run_dir / SUMMARY, build_summary(cfg, RunLog(), {}, recorder.finish(), recorder))
    return run_dir


def _audit(run_dir, *extra, env=None, noiseless=False):
    """``fedpriv audit --empirical`` in this process (its canary runs on threads of it);
    ``noiseless``: the canary runs train with the test harness's noiseless trainer."""
    args = ("audit", str(run_dir), "--empirical", "--json", *extra)
    with injected.installed(noiseless=noiseless):
        proc = run_cli_here(*args, env=env)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)


@pytest.mark.slow
def test_power_without_dp(tmp_path):
    # The audit reads only the run's configuration from its ledger and trains it once more with
    # canaries, so a ledger the server writes for a no-DP run is all it needs (the next test
    # also audits a run that really trained).
    run = _ledger_of(load_config(preset_layers("no-dp"), [*SMALL, "run.rounds=8"]), tmp_path / "nodp")
    proc, report = _audit(run, "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = report["empirical"]
    print(f"power (no DP): lower bound {result['epsilon_lower_bound']:.3f}, "
          f"{result['correct']} of {result['guesses']} guesses right")
    assert result["epsilon_lower_bound"] >= 1.0, result
    assert result["consistent"] is True and result["accounted_epsilon"] is None
    assert result["verdict"] == "consistent" and "no record-level DP" in result["notes"][0]
    assert result["canaries"] == 1000 and result["canary_seed"] == 1 and result["rounds"] == 8
    assert result["guesses"] >= result["correct"] > result["guesses"] / 2
    assert set(result["membership_inference"]) == {"canary_run_model"}  # the run left no model.sealed
    assert 0 <= result["auc"] <= 1 and result["auc"] == result["membership_inference"]["canary_run_model"]["auc"]
    saved = json.loads((run / "audit-empirical.json").read_text())
    assert saved["epsilon_lower_bound"] == result["epsilon_lower_bound"]
    markdown = (run / "audit.md").read_text()
    assert "## Empirical audit" in markdown and "**consistent**" in markdown and "measured lower bound" in markdown


@pytest.mark.slow(cost=2)
def test_consistent_when_honest_and_a_violation_when_the_noise_is_skipped(tmp_path):
    # The honest audit reads the DP configuration from the ledger the server writes for it (as in
    # test_power_without_dp) and keeps its canary run (--work-dir): an honest DP run of that
    # configuration, with its ledger, summary and model. The noiseless audit then audits that run,
    # one that really trained, so no separate `fedpriv simulate` of the same configuration is needed.
    configured = _ledger_of(load_config(preset_layers("quickstart"), SMALL_DP), tmp_path / "configured")
    run = tmp_path / "dp"
    configured_before = _fingerprint(configured)

    proc, honest = _audit(configured, "--seed", "2", "--work-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / SUMMARY).read_text())
    accounted = summary["privacy"]["record_level"]["max_epsilon"]
    assert 0.2 < accounted < 0.5
    result = honest["empirical"]
    print(f"consistency: lower bound {result['epsilon_lower_bound']:.3f} <= accounted "
          f"{result['accounted_epsilon']:.3f} (run: {accounted:.3f})")
    assert result["consistent"] is True and result["verdict"] == "consistent"
    assert result["epsilon_lower_bound"] <= result["accounted_epsilon"] <= accounted
    assert result["work_dir"] == str(run) and result["accounted"]["run"] is None  # the ledger alone spent nothing
    assert set(result["membership_inference"]) == {"canary_run_model"}  # the configured ledger has no model.sealed
    assert _fingerprint(configured) == configured_before  # the audited run is only read
    before = _fingerprint(run)
    assert before["model.sealed"] is not None

    proc, broken = _audit(run, "--seed", "2", noiseless=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = broken["empirical"]
    print(f"detection: lower bound {result['epsilon_lower_bound']:.3f} > accounted {result['accounted_epsilon']:.3f}")
    assert result["consistent"] is False
    assert result["verdict"] == "VIOLATION: measured leakage exceeds the accounted bound"
    assert result["epsilon_lower_bound"] > 1.0 > result["accounted_epsilon"], result
    assert broken["ok"] is False and any("VIOLATION" in f for f in broken["failures"])
    assert "VIOLATION" in (run / "audit.md").read_text()
    # the audit recomputes the run's own accounting, and scores its sealed model too
    assert result["accounted"]["run"]["rdp"] == pytest.approx(accounted)
    assert set(result["membership_inference"]) == {"run_model", "canary_run_model"}
    assert _fingerprint(run) == before
