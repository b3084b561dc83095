"""Each user-level noise mode is one object (common/user_dp.py): it encodes on the client,
releases on the server and returns the release's DpEvent and parameters with it.

Events are compared with ones built here from dp-accounting directly; the distributed bound is
recomputed from the paper's formula (tests/test_distributed_dp_bound.py)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from fedpriv.clients.app import encode_update
from fedpriv.common import user_dp
from fedpriv.common.config import load_config
from tests.test_distributed_dp_bound import _paper_rho


def seeded(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def _cfg(mode: str, *extra: str):
    return load_config(overrides=[
        "federation.num_clients=10", "federation.min_available_clients=10", "federation.min_train_clients=3",
        "federation.fraction_train=0.5", "user_dp.enabled=true", f"user_dp.noise_mode={mode}",
        "user_dp.noise_multiplier=1.2", "user_dp.clipping_norm=0.5", "secure_aggregation.num_shares=3",
        "secure_aggregation.reconstruction_threshold=2", *extra,
    ])


def test_no_object_without_user_level_dp():
    assert user_dp.noise_for(load_config(overrides=["user_dp.enabled=false"]), 10) is None


def test_central_mode_clips_on_the_client_and_releases_a_poisson_sampled_gaussian():
    cfg, d = _cfg("central"), 6
    mode = user_dp.noise_for(cfg, d)
    assert mode.mode == "central" and not mode.integers
    update = [np.full(d, 1.0)]
    encoded, norm = mode.encode(update, 5, seeded(1))
    assert norm == pytest.approx(math.sqrt(d))
    assert float(np.linalg.norm(encoded[0])) == pytest.approx(0.5)
    # The client's encode_update goes through the same object: same bytes, same update.
    via_client, _ = encode_update(cfg, [np.zeros(d)], update, 5, seeded(1))
    assert np.allclose(via_client[0], encoded[0])
    release = mode.release([encoded[0] / 5], 5, 5, 10, 5.0, seeded(2))
    assert release.event == dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.2))
    assert release.sampling == "poisson" and release.delta_addition == 0.0
    assert release.parameters["noise_mode"] == "central" and len(release.noisy_sum) == 1
    assert user_dp.ASSUMPTIONS["central"] == mode.ASSUMPTIONS


def test_distributed_mode_encodes_integers_and_releases_its_zcdp_event():
    cfg, d = _cfg("distributed"), 6
    mode = user_dp.noise_for(cfg, d)
    assert mode.mode == "distributed" and mode.integers
    update = [np.linspace(-1, 1, d)]
    encoded, norm = mode.encode(update, 5, seeded(3))
    assert np.all(encoded[0] == np.rint(encoded[0]))
    via_client, _ = encode_update(cfg, [np.zeros(d)], update, 5, seeded(3))
    assert np.array_equal(via_client[0], encoded[0])
    contributors = 4
    release = mode.release([encoded[0]], contributors, 5, 10, 5.0)  # a "mean" of one integer vector
    p = release.parameters
    l2 = 0.5 * p["scale"] + math.sqrt(d)
    rho, _ = _paper_rho(l2, l2 * min(math.sqrt(d), l2), p["local_std"], contributors, d)
    assert isinstance(release.event, dp_accounting.ZCDpEvent)
    assert release.event.rho == pytest.approx(rho, rel=1e-9)
    assert release.noise_multiplier == pytest.approx(1 / math.sqrt(2 * rho))
    assert release.sampling == "none" and 0 < release.delta_addition < 1e-15
    # Decoding undoes the scaling: the integer sum of `contributors` copies, over the scale.
    assert np.allclose(release.noisy_sum[0], encoded[0] * contributors / p["scale"])
    # Before a round: a bound at least as large as any round of this population.
    worst, addition = mode.bound_before_round(10, 5.0)
    assert worst.rho >= release.event.rho and addition >= release.delta_addition
    skipped = mode.skipped(10, 5.0)
    assert skipped.event == worst and skipped.sampling == "none"


def test_the_no_signal_figure_is_the_noise_the_server_adds_over_what_updates_can_add():
    """noise_to_signal (fedpriv simulate's warning) against the mechanism itself: the noise
    release() puts on the mean update over a run's rounds, in L2, over rounds x clip."""
    from fedpriv.common.presets import preset_layers

    d, rounds, clients = 10_000, 5, 10
    cfg = load_config(overrides=["user_dp.enabled=true", "secure_aggregation.enabled=false", "user_dp.clipping_norm=0.3",
                                 f"run.rounds={rounds}", f"federation.num_clients={clients}"])
    noise = user_dp.noise_for(cfg, d)
    total = sum(noise.release([np.zeros(d)], clients, clients, clients, clients).noisy_sum[0] / clients
                for _ in range(rounds))
    measured = float(np.linalg.norm(total)) / (rounds * 0.3)
    assert user_dp.noise_to_signal(cfg, d) == pytest.approx(measured, rel=0.05)
    warnings = user_dp.preflight_warnings(cfg, d)
    assert any(w.startswith(f"user-level noise leaves no signal: over the run's {rounds} rounds the noise on the "
                            f"averaged updates is {user_dp.noise_to_signal(cfg, d):.1f}x") for w in warnings)
    # The cross-device preset (about 50 of 1,000 devices a round, 20 rounds) learns: no warning.
    cross_device = load_config(preset_layers("cross-device"))
    assert user_dp.noise_to_signal(cross_device, 93_322) < user_dp.NO_SIGNAL_RATIO
    assert not any("no signal" in w for w in user_dp.preflight_warnings(cross_device, 93_322))
