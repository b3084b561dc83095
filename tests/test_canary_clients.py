"""Canary clients for the user-level (DP-FedAvg) claim: fixed random directions at the clipping
norm join the server's user-level sums before the noise, scored by their cosine with the model's
change (Andrew et al., ICLR 2024), with the one-run bounds and the test of the accountant's
user-level profile beside the estimate."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from fedpriv.common import empirical
from fedpriv.common.canaries import CanaryClients
from fedpriv.common.config import load_config
from fedpriv.common.presets import preset_layers
from tests import injected
from tests.conftest import run_cli_here
from tests.test_empirical import _ledger_of


def test_canary_clients_join_the_sum_at_the_clipping_norm(tmp_path):
    clients = CanaryClients(seed=3, count=20, sink=str(tmp_path))
    members = np.flatnonzero(clients.included())
    assert 0 < len(members) < 20 and np.array_equal(members, np.flatnonzero(CanaryClients(3, 20, "").included()))
    u = clients.direction(int(members[0]), 12)
    assert np.linalg.norm(u) == pytest.approx(1.0) and not np.allclose(u, clients.direction(int(members[1]), 12))
    mean = [np.ones((3, 2)), np.full(6, 2.0)]
    draws = np.ones(len(members))
    draws[0] = 0.0  # only the first included canary is sampled
    joined, contributors = clients.join(mean, 4, 0.5, 2.5, lambda k: draws[:k])
    assert contributors == 5
    total = np.concatenate([a.ravel() for a in joined]) * 5
    np.testing.assert_allclose(total, np.concatenate([a.ravel() for a in mean]) * 4 + 2.5 * u)
    assert clients.join(mean, 4, 0.5, 2.5, lambda k: np.ones(k)) == (mean, 4)
    cosines = clients.cosines(3.0 * u)
    assert cosines[members[0]] == pytest.approx(1.0) and abs(cosines[members[1]]) < 1


def test_the_gaussian_estimate_recovers_a_known_mu():
    rng = np.random.default_rng(1)
    inside, outside = rng.normal(1.0, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000)
    estimate = empirical.gaussian_estimate(inside, outside, 1e-5)
    assert estimate["mu"] == pytest.approx(1.0, abs=0.03)
    assert estimate["epsilon"] == pytest.approx(dp_accounting.get_epsilon_gaussian(1.0, 1e-5), rel=0.05)
    assert empirical.gaussian_estimate(outside, inside, 1e-5)["epsilon"] == 0.0


# A small cross-device federation: 60 devices, each sampled with probability 0.25, 4 rounds of one
# local epoch, user-level noise 1.0, SecAgg+ off for speed (it does not change the sums).
SMALL_CROSS_DEVICE = ["federation.num_clients=60", "federation.min_available_clients=60",
                      "federation.fraction_train=0.25", "run.rounds=4", "secure_aggregation.enabled=false",
                      "client.local_epochs=1", "user_dp.noise_multiplier=1.0"]


def _audit(run_dir, **bug):
    with injected.installed(**bug):
        proc = run_cli_here("audit", str(run_dir), "--empirical", "--json", "--seed", "5")
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)["empirical"]


@pytest.mark.slow(cost=2)
def test_canary_clients_estimate_below_the_claim_and_catch_missing_user_noise(tmp_path):
    run = _ledger_of(load_config(preset_layers("cross-device"), SMALL_CROSS_DEVICE), tmp_path / "configured")
    proc, honest = _audit(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    user = honest["user_level"]
    print(f"canary clients, honest: estimate {user['estimate']:.2f}, f-DP bound {user['gdp_epsilon_lower_bound']:.2f}"
          f" vs accounted {user['accounted_epsilon']:.2f}")
    assert user["canary_clients"] == 1000 and user["consistent"] and honest["verdict"] == "consistent"
    assert 0 < user["estimate"] <= user["accounted_epsilon"]
    assert user["gdp_epsilon_lower_bound"] <= user["accounted_epsilon"] and user["claim_rejected"] is False
    assert user["mean_cosine_in"] > user["mean_cosine_out"]

    proc, broken = _audit(run, user_noiseless=True)
    user = broken["user_level"]
    print(f"canary clients, no user-level noise: estimate {user['estimate']:.2f}, f-DP bound "
          f"{user['gdp_epsilon_lower_bound']:.2f} vs accounted {user['accounted_epsilon']:.2f}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert user["estimate"] > 1 and user["estimate"] > user["accounted_epsilon"]
    assert user["claim_rejected"] is True and not user["consistent"]
    assert broken["verdict"].startswith("VIOLATION")
