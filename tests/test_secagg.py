"""Noise samplers, update encoding and the arithmetic of SecAgg+ with user-level DP.

The SecAgg+ sum is reproduced here with Flower's own quantization helpers (masks cancel in the
modular sum; tests/test_secagg_e2e.py runs the real protocol and checks the masking itself).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine, factor_extract, parameters_addition, parameters_mod, parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedpriv.clients.app import encode_update
from fedpriv.common import secagg
from fedpriv.common.config import ConfigError, load_config
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy


def seeded(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def test_uniform_and_gaussian_from_byte_source():
    u = secagg.uniform(200_000, seeded(1))
    assert u.min() > 0 and u.max() <= 1
    assert abs(u.mean() - 0.5) < 0.005
    g = secagg.gaussian((400, 500), 3.0, seeded(2))
    assert g.shape == (400, 500)
    assert abs(g.mean()) < 0.03 and g.std() == pytest.approx(3.0, rel=0.01)
    # A different byte source gives different noise; the same one, the same noise.
    assert not np.array_equal(secagg.gaussian((10,), 1.0, seeded(3)), secagg.gaussian((10,), 1.0, seeded(4)))
    assert np.array_equal(secagg.gaussian((10,), 1.0, seeded(3)), secagg.gaussian((10,), 1.0, seeded(3)))


def test_discrete_gaussian_matches_its_pmf():
    sigma = 1.7
    draws = secagg.discrete_gaussian((200_000,), sigma, seeded(5))
    assert draws.dtype == np.int64
    support = np.arange(-12, 13)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([(draws == k).sum() for k in support])
    expected = pmf * draws.size
    keep = expected > 5
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    assert chi2 < 60, chi2  # ~ chi-square with ~15 degrees of freedom; 60 is far in the tail
    exact_var = float((pmf * support**2).sum())
    assert draws.var() == pytest.approx(exact_var, rel=0.02)
    large = secagg.discrete_gaussian((100_000,), 250.0, seeded(6))
    assert large.std() == pytest.approx(250.0, rel=0.01)
    assert np.all(secagg.discrete_gaussian((5,), 0.0) == 0)


def test_randomized_rounding_is_unbiased_and_clipping_bounds_the_norm():
    x = np.full(100_000, 2.3)
    r = secagg.randomized_round(x, seeded(7))
    assert set(np.unique(r)) == {2, 3}
    assert r.mean() == pytest.approx(2.3, abs=0.005)
    arrays = [np.full((3, 4), 2.0), np.full(5, -1.0)]
    clipped, norm = secagg.clip_l2(arrays, 1.5)
    assert norm == pytest.approx(math.sqrt(12 * 4 + 5))
    assert math.sqrt(sum((a**2).sum() for a in clipped)) == pytest.approx(1.5)
    same, _ = secagg.clip_l2([np.array([0.3, 0.4])], 1.0)
    assert np.allclose(same[0], [0.3, 0.4])


def _distributed_cfg(**extra):
    overrides = [
        "federation.num_clients=5", "federation.min_available_clients=5", "federation.min_train_clients=3",
        "user_dp.enabled=true", "user_dp.noise_mode=distributed", "user_dp.noise_multiplier=1.0",
        "user_dp.clipping_norm=0.5", "secure_aggregation.num_shares=3",
        "secure_aggregation.reconstruction_threshold=2", *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(overrides=overrides)


def _secagg_mean(cfg, vectors: list[list[np.ndarray]]) -> list[np.ndarray]:
    """What SecAggPlusWorkflow hands the strategy for these client vectors (user-level DP:
    every weight is 1), using Flower's quantization helpers."""
    target = cfg.secure_aggregation.quantization_range
    clip_range = secagg.flower_clipping_range(cfg)
    q_ratio = round(1.0 / secagg.flower_max_weight(cfg) * target)
    total = None
    for vec in vectors:
        quantized = quantize(parameters_multiply(vec, q_ratio / target), clip_range, target)
        # In the protocol the int64 masks promote the sum to int64; they cancel, so add none.
        combined = [a.astype(np.int64) for a in factor_combine(q_ratio, quantized)]
        total = combined if total is None else parameters_addition(total, combined)
    ratio, summed = factor_extract(parameters_mod(total, secagg.MODULUS))
    out = dequantize(summed, clip_range, target)
    return [(a - (len(vectors) - 1) * clip_range) * (target / ratio) for a in out]


def test_distributed_noise_on_the_sum_has_the_configured_variance():
    """Clients at the worst tolerated dropout: the decoded sum carries noise of exactly
    noise_multiplier * sensitivity, checked over many seeded trials on a tiny vector."""
    cfg = _distributed_cfg()
    sampled = 5
    start = [np.zeros(3)]
    updates = [[np.array([0.2, -0.1, 0.05]) * (i + 1)] for i in range(sampled)]
    plan = secagg.distributed_noise(cfg, 3, sampled)
    assert plan.min_clients == sampled - 1  # num_shares - threshold = 1 dropout tolerated
    contributors = plan.min_clients
    clipped = [secagg.clip_l2(u, cfg.user_dp.clipping_norm)[0][0] for u in updates[:contributors]]
    true_sum = np.sum(clipped, axis=0)
    source = seeded(11)
    trials = []
    for _ in range(3000):
        vectors = [encode_update(cfg, start, [start[0] + u[0]], sampled, source)[0] for u in updates[:contributors]]
        for v in vectors:  # every value is an integer inside Flower's quantization range
            assert np.all(v[0] == np.rint(v[0])) and np.all(np.abs(v[0]) <= plan.range_half_width)
        mean = _secagg_mean(cfg, vectors)
        trials.append(secagg.decode_distributed_sum(mean, contributors, plan)[0])
    trials = np.array(trials)
    configured_std = cfg.user_dp.noise_multiplier * plan.sensitivity / plan.scale  # in update units
    assert plan.noise_multiplier_applied(contributors) == pytest.approx(cfg.user_dp.noise_multiplier)
    assert trials.var(axis=0, ddof=1) == pytest.approx(np.full(3, configured_std**2), rel=0.08)
    standard_error = configured_std / math.sqrt(len(trials))
    assert np.all(np.abs(trials.mean(axis=0) - true_sum) < 4.5 * standard_error)
    # With no dropout, more clients add noise: the applied multiplier is larger, never smaller.
    assert plan.noise_multiplier_applied(sampled) == pytest.approx(math.sqrt(sampled / contributors))


def test_without_noise_the_secagg_sum_is_the_rounded_sum():
    cfg = _distributed_cfg(**{"user_dp.noise_multiplier": 0.0})
    start = [np.zeros(4)]
    updates = [np.array([0.11, -0.2, 0.03, 0.0]) * k for k in (1, 2, 3)]
    plan = secagg.distributed_noise(cfg, 4, 5)
    vectors = [encode_update(cfg, start, [u], 5, seeded(k))[0] for k, u in enumerate(updates)]
    decoded = secagg.decode_distributed_sum(_secagg_mean(cfg, vectors), 3, plan)[0]
    clipped = np.sum([secagg.clip_l2([u], 0.5)[0][0] for u in updates], axis=0)
    assert np.allclose(decoded, clipped, atol=3 / plan.scale)  # at most one rounding unit per client


def test_central_noise_has_std_multiplier_times_sensitivity(tmp_path):
    cfg = load_config(overrides=["user_dp.enabled=true", "user_dp.noise_multiplier=0.8",
                                 "user_dp.clipping_norm=0.5", "federation.fraction_train=1.0"])
    initial = [np.zeros((50, 20), dtype=np.float32)]
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, initial, RunLog(), recorder, lambda r, w: (0.0, 0.0))
    samples = []
    for rnd in range(1, 101):
        strategy.rounds[rnd].plan(10, 10.0)
        strategy.rounds[rnd].sampled = set(range(10))
        out = strategy._privatize(rnd, [np.zeros((50, 20))], contributors=10)
        samples.append(out[0] * 10.0)  # back to the noisy sum
    noise = np.concatenate([s.ravel() for s in samples])
    sensitivity = secagg.central_sensitivity(cfg, 1000)
    assert sensitivity == pytest.approx(0.5 + secagg.quantization_step(cfg) * math.sqrt(1000))
    assert noise.std() == pytest.approx(0.8 * sensitivity, rel=0.02)
    assert abs(noise.mean()) < 0.01
    recorder.finish()


def test_quantization_precision_is_checked_for_the_model_size():
    assert secagg.precision_warnings(load_config(), 100_000) == []
    coarse = load_config(overrides=["secure_aggregation.quantization_range=1024"])
    assert any("quantization can move" in w for w in secagg.precision_warnings(coarse, 1_000_000))
    user_dp = load_config(overrides=["user_dp.enabled=true", "secure_aggregation.quantization_range=65536"])
    assert any("of user_dp.clipping_norm" in w for w in secagg.precision_warnings(user_dp, 1_000_000))
    tiny = _distributed_cfg(**{"secure_aggregation.quantization_range": 4096})
    with pytest.raises(ConfigError, match="too small for distributed noise"):
        secagg.precision_warnings(tiny, 1_000_000)
    assert secagg.precision_warnings(_distributed_cfg(), 100_000) == []
    assert secagg.precision_warnings(load_config(overrides=["secure_aggregation.enabled=false"]), 10**7) == []


class _Node:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


def test_without_secagg_bad_updates_are_rejected_one_by_one(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    cfg = load_config(overrides=["secure_aggregation.enabled=false", "dp.enabled=false",
                                 "federation.min_train_clients=1"])
    initial = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    run_log = RunLog()
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, initial, run_log, recorder, lambda r, w: (0.0, 0.0))
    strategy.rounds[1].plan(3, 3.0)
    strategy.rounds[1].sampled = {1, 2, 3}

    def res(arrays, weight=10):
        return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), weight, {})

    good = [np.ones((2, 3), dtype=np.float32), np.full(3, 2.0, dtype=np.float32)]
    results = [
        (_Node(1), res(good)),
        (_Node(2), res([np.ones((3, 2), dtype=np.float32), np.ones(3, dtype=np.float32)])),
        (_Node(3), res([np.full((2, 3), np.nan, dtype=np.float32), np.ones(3, dtype=np.float32)])),
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    new = parameters_to_ndarrays(parameters)
    assert np.allclose(new[0], 1.0) and np.allclose(new[1], 2.0)  # only the good update, applied in full
    reasons = [f["reason"] for f in run_log.failures]
    assert any("node 2: update rejected (array 0 has shape (3, 2), the model's is (2, 3))" in r for r in reasons)
    assert any("node 3: update rejected (non-finite values" in r for r in reasons)
    # All bad: the round fails cleanly and the model is kept.
    strategy.rounds[2].plan(3, 3.0)
    strategy.rounds[2].sampled = {2, 3}
    assert strategy.aggregate_fit(2, results[1:], [])[0] is None
    assert strategy.rounds[2].failed == "no client update could be aggregated"
    assert np.allclose(strategy.latest[0], 1.0)
    recorder.finish()
