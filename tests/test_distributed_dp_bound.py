"""Distributed user-level noise is accounted by a rigorous bound, recomputed here independently.

For each round that the server records in distributed mode, the test recomputes, with numpy
written out here, Kairouz, Liu and Steinke's (ICML 2021) bound for the sum of the contributors'
discrete Gaussians (Proposition 14: tau, the L2 and L1 sensitivities of the scaled, randomized-
rounded vector, and the three Renyi-divergence terms, each at most alpha * rho for alpha >= 1),
composes the rounds with dp-accounting directly as Gaussians of noise multiplier 1/sqrt(2 rho)
with no sampling amplification, charges the SecAgg+ range-overflow probability to delta, and
compares with the ledger. It also checks that the bound is never below the continuous-Gaussian
approximation the code used before.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedpriv.common.audit import audit_run
from fedpriv.common.config import load_config
from fedpriv.common.ledger import verify_ledger
from fedpriv.server.privacy import PrivacyRecorder, UserBudgetExhausted
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy

DELTA = 1e-5


def _cfg(population: int, z: float, quantization_range: int, **extra):
    overrides = [
        f"federation.num_clients={population}", f"federation.min_available_clients={population}",
        "federation.min_train_clients=3", "federation.fraction_train=1.0",
        "user_dp.enabled=true", "user_dp.noise_mode=distributed", f"user_dp.noise_multiplier={z}",
        "user_dp.clipping_norm=0.5", "secure_aggregation.num_shares=3",
        "secure_aggregation.reconstruction_threshold=2",
        f"secure_aggregation.quantization_range={quantization_range}", f"privacy.delta={DELTA}",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(overrides=overrides)


def _run_rounds(tmp_path, cfg, dimension: int, population: int, contributors: list[int]):
    """Record one distributed round per entry of ``contributors`` (everyone sampled)."""
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    initial = [np.zeros(dimension, dtype=np.float32)]
    strategy = FedprivStrategy(cfg, initial, RunLog(), recorder, lambda r, w: (0.0, 0.0))
    for rnd, n in enumerate(contributors, start=1):
        strategy.rounds[rnd].plan(population, float(population))
        strategy.rounds[rnd].sampled = set(range(population))
        strategy._privatize(rnd, [np.zeros(dimension)], contributors=n)
    figures = recorder.finish()
    entries = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "user_level"]
    return entries, figures


def _paper_rho(l2: float, l1: float, sigma: float, n: int, d: int) -> tuple[float, float]:
    """Kairouz, Liu and Steinke 2021, Proposition 14, as a zCDP rho; and tau."""
    k = np.arange(1, n, dtype=np.float64)
    tau = 10.0 * np.sum(np.exp(-2.0 * np.pi**2 * sigma**2 * k / (k + 1.0)))
    s2 = l2 / (np.sqrt(n) * sigma)
    s1 = l1 / (np.sqrt(n) * sigma)
    # D_alpha <= alpha s2^2/2 + tau d <= alpha (s2^2/2 + tau d) for alpha >= 1, and the other two
    # terms are already alpha times a constant.
    rho = min(s2**2 / 2 + tau * d, (s2**2 + 2 * s1 * tau + tau**2 * d) / 2, (s2 + np.sqrt(d) * tau) ** 2 / 2)
    return float(rho), float(tau)


SETTINGS = {
    # name: (population, z, quantization_range, dimension, contributors per round)
    "small local noise, few contributors": (5, 0.05, 64, 1, [4, 5]),
    "small local noise, many contributors": (60, 0.05, 256, 1, [59, 60]),
    "large local noise, few contributors": (5, 2.0, 2**16, 20, [4, 5]),
    "large local noise, many contributors": (60, 2.0, 2**16, 20, [59, 60, 59]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_ledger_epsilon_is_the_papers_bound_and_never_below_the_gaussian_approximation(tmp_path, name):
    population, z, qrange, d, contributors = SETTINGS[name]
    cfg = _cfg(population, z, qrange)
    entries, figures = _run_rounds(tmp_path, cfg, d, population, contributors)
    assert len(entries) == len(contributors)
    half = qrange // 2
    exact = rdp.RdpAccountant()
    approx_amplified = rdp.RdpAccountant()
    approx_plain = rdp.RdpAccountant()
    overflow_total = 0.0
    for entry, n in zip(entries, contributors):
        p = entry["parameters"]
        assert p["clients_contributing"] == n and p["dimension"] == d
        sigma, scale = p["local_std"], p["scale"]
        # Randomized rounding moves each coordinate by less than 1: ||round(x)||_2 < ||x||_2 + sqrt(d).
        l2 = 0.5 * scale + math.sqrt(d)
        assert p["sensitivity"] == pytest.approx(l2, rel=1e-12)
        l1 = l2 * min(math.sqrt(d), l2)  # ||v||_1 <= sqrt(d) ||v||_2, and <= ||v||_2^2 for integers
        rho, tau = _paper_rho(l2, l1, sigma, n, d)
        assert p["tau"] == pytest.approx(tau, rel=1e-9, abs=1e-300)
        assert p["zcdp_rho"] == pytest.approx(rho, rel=1e-9)
        # A coordinate is at most 0.5 * scale + 1 before noise; the discrete Gaussian is
        # sigma-subgaussian, so |noise| > t has probability at most 2 exp(-t^2 / (2 sigma^2)).
        t = half - (0.5 * scale + 1)
        overflow = min(1.0, n * d * 2 * math.exp(-t**2 / (2 * sigma**2)))
        assert p["delta_addition"] == pytest.approx(overflow, rel=1e-9)
        overflow_total += overflow
        exact.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho)))
        expected = exact.get_epsilon(DELTA - overflow_total)
        assert entry["epsilon"]["rdp"] == pytest.approx(expected, rel=1e-6), name
        # The continuous-Gaussian approximation (noise std sigma sqrt(n) on sensitivity l2),
        # with and without Poisson amplification, is never above the rigorous bound.
        z_approx = sigma * math.sqrt(n) / l2
        approx_amplified.compose(dp_accounting.PoissonSampledDpEvent(
            1.0 * population / population, dp_accounting.GaussianDpEvent(z_approx)))
        approx_plain.compose(dp_accounting.GaussianDpEvent(z_approx))
        assert entry["epsilon"]["rdp"] >= approx_plain.get_epsilon(DELTA) * (1 - 1e-9)
        assert entry["epsilon"]["rdp"] >= approx_amplified.get_epsilon(DELTA) * (1 - 1e-9)
        assert entry["sampling"] == "none"  # no amplification claimed
    assert figures["user_level"]["rdp"] == pytest.approx(exact.get_epsilon(DELTA - overflow_total), rel=1e-6)
    assert figures["user_level"]["pld"] is None  # a zCDP bound gives no privacy loss distribution
    assert figures["user_level_gaussian_approximation"] <= figures["user_level"]["rdp"]
    # The audit replays the same bound from the ledger.
    report = audit_run(tmp_path / "run")
    assert report["epsilon"]["user_level"]["rdp"] == pytest.approx(figures["user_level"]["rdp"], rel=1e-9)
    assert not [f for f in report["failures"] if "epsilon" in f], report["failures"]


def test_sampling_amplification_is_not_claimed_for_distributed_noise(tmp_path):
    """With a fraction of the population sampled, the central mode's accounting would amplify;
    the distributed bound is the same as if everyone had been sampled."""
    population, z, d = 20, 1.0, 10
    cfg = _cfg(population, z, 2**16, **{"federation.fraction_train": 0.25})
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, [np.zeros(d, dtype=np.float32)], RunLog(), recorder,
                               lambda r, w: (0.0, 0.0))
    strategy.rounds[1].plan(population, 5.0)
    strategy.rounds[1].sampled = set(range(5))
    strategy._privatize(1, [np.zeros(d)], contributors=4)
    entry = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "user_level"][0]
    p = entry["parameters"]
    l2 = 0.5 * p["scale"] + math.sqrt(d)
    rho, _ = _paper_rho(l2, l2 * min(math.sqrt(d), l2), p["local_std"], 4, d)
    plain = rdp.RdpAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho)))
    assert entry["epsilon"]["rdp"] == pytest.approx(plain.get_epsilon(DELTA - p["delta_addition"]), rel=1e-6)
    amplified = rdp.RdpAccountant()
    amplified.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * rho))))
    assert entry["epsilon"]["rdp"] > 1.5 * amplified.get_epsilon(DELTA)
    recorder.finish()


def test_budget_check_before_a_distributed_round_uses_a_bound_on_any_sample(tmp_path, own_server_state):
    """Before sampling, the server must stop if some possible round could pass the budget: the
    check uses the worst case (everyone sampled and contributing), not the amplified Gaussian."""
    population, z, d = 20, 1.0, 10
    # One unamplified round at z = 1 costs about 5.3 at delta 1e-5; a Poisson-amplified one at
    # q = 0.25 far less. A budget of 4 lets the amplified approximation through, not the bound.
    cfg = _cfg(population, z, 2**16, **{"federation.fraction_train": 0.25, "privacy.user_budget": 4.0})
    amplified = rdp.RdpAccountant()
    amplified.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(z)))
    assert amplified.get_epsilon(DELTA) < 4.0
    plain = rdp.RdpAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(z))
    assert plain.get_epsilon(DELTA) > 4.0
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, [np.zeros(d, dtype=np.float32)], RunLog(), recorder,
                               lambda r, w: (0.0, 0.0))
    with pytest.raises(UserBudgetExhausted):
        recorder.check_user_budget(1, population, 5.0, strategy.user_noise.bound_before_round(population, 5.0))
    stop = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "budget_stop"]
    assert len(stop) == 1
