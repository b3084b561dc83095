"""The white-box empirical audit (``fedpriv audit --empirical --white-box``): gradient canaries
through DP-SGD's own clipping, sampling and noise, scored from every step's released gradient, and
the Gaussian f-DP one-run bound (Mahloujifar, Melis and Chaudhuri 2024) beside Steinke et al.'s.

Privacy numbers are checked against dp-accounting (the Gaussian mechanism's epsilon, the PLD of
the composed DP-SGD events), never against fedpriv's own figures."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from fedpriv.clients.whitebox import WhiteBoxTrainer, collect
from fedpriv.common import accounting, empirical
from fedpriv.common.canaries import GRADIENT_NORM_FACTOR, GradientCanaries
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.common.presets import preset_layers
from tests import injected
from tests.conftest import run_cli_here
from tests.injected import ShuffledTrainer, UnclippedTrainer
from tests.test_empirical import _ledger_of


# ---- the f-DP bound, on a mechanism whose privacy is known exactly -------------------------------
def _gaussian_scores(rng, m, mu):
    """Canary scores of the Gaussian mechanism with sensitivity 1 and noise 1/mu: the observation
    itself is the optimal score (exactly mu-GDP per canary)."""
    included = rng.random(m) < 0.5
    return included + rng.normal(0.0, 1.0 / mu, m), included


def test_the_f_dp_bound_is_valid_and_tighter_than_the_randomized_response_one():
    delta, m, mu = 1e-5, 2000, 1.0
    true_epsilon = dp_accounting.get_epsilon_gaussian(1.0 / mu, delta)  # about 3.7
    grid = np.linspace(0, 20, 400)
    own = accounting.privacy_profile([dp_accounting.GaussianDpEvent(1.0 / mu)], grid)
    claim = empirical.profile_tradeoff(grid, own)
    rng = np.random.default_rng(7)
    gdp, steinke, rejected = [], [], 0
    for _ in range(8):
        result = empirical.one_run_audit(*_gaussian_scores(rng, m, mu), delta, claim=claim)
        gdp.append(result["gdp_epsilon_lower_bound"])
        steinke.append(result["epsilon_lower_bound"])
        rejected += result["claim_rejected"]
    print(f"Gaussian mechanism, epsilon {true_epsilon:.2f}: f-DP bounds {np.round(gdp, 2)}, "
          f"Steinke et al. {np.round(steinke, 2)}")
    assert max(gdp) <= true_epsilon and rejected == 0  # valid: never above the truth, the truth never rejected
    assert np.mean(gdp) > 1.2 * np.mean(steinke)  # and tighter
    assert min(gdp) > 0.35 * true_epsilon
    # Twice the signal (half the noise) is caught against the same claim, and the bound passes the truth.
    broken = empirical.one_run_audit(*_gaussian_scores(rng, m, 2 * mu), delta, claim=claim)
    assert broken["claim_rejected"] and broken["gdp_epsilon_lower_bound"] > true_epsilon


def test_the_f_dp_recursion_needs_more_than_chance():
    blow_up = empirical.gaussian_blow_up(1.0, 1e-5)
    assert not empirical.fdp_rejects(blow_up, 1000, 200, 100, 0.05)  # half right: nothing
    assert not empirical.fdp_rejects(blow_up, 1000, 0, 0, 0.05)
    assert empirical.fdp_rejects(blow_up, 1000, 200, 200, 0.05)  # all right: epsilon 1 cannot do it
    assert not empirical.fdp_rejects(empirical.gaussian_blow_up(20.0, 1e-5), 1000, 200, 200, 0.05)
    assert empirical.gdp_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    bounds = [empirical.gdp_epsilon_lower_bound(1000, 200, v, 1e-5) for v in (150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    with pytest.raises(ValueError):
        empirical.profile_tradeoff([0.0, 1.0], [0.1])


# ---- gradient canaries inside the DP-SGD step ---------------------------------------------------
def _trainer(cls, **dp):
    cfg = load_config(overrides=["data.dataset=digits", "model.name=mlp", "model.mlp_units=8",
                                 "dp.implementation=bookkeeping", "dp.l2_norm_clip=0.5",
                                 *[f"dp.{k}={v}" for k, v in dp.items()]])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    trainer = cls("mlp", cfg.model, cfg.client, cfg.dp, dataset.input_shape, dataset.num_classes)
    return trainer, dataset


def _released(trainer, x, y, sampled, watched):
    trainer.taps.sampled.assign(np.asarray(sampled, np.int64))
    trainer.taps.watched.assign(np.asarray(watched, np.int64))
    start = [np.asarray(w) for w in trainer.model.get_weights()]
    trainer.step(x, y)
    trainer.model.set_weights(start)
    return trainer.taps.observed.numpy().astype(np.float64)


@pytest.mark.parametrize("cls, expected", [(WhiteBoxTrainer, 1.0), (UnclippedTrainer, GRADIENT_NORM_FACTOR)])
def test_a_gradient_canary_is_clipped_and_averaged_like_an_example(cls, expected):
    trainer, dataset = _trainer(cls, noise_multiplier=0.0)
    x, y = dataset.x_train[:20], dataset.y_train[:20]
    # the canary at a first-layer weight of an input feature that is 0 in every record here: no
    # example has a gradient there, whoever is clipped
    units = trainer.model.trainable_variables[0].shape[1]
    feature = int(np.flatnonzero(np.all(x.reshape(len(x), -1) == 0, axis=0))[0])
    canary = feature * units + 1
    watched = [3, canary, trainer.num_parameters - 1]
    without = _released(trainer, x, y, [], watched) * 20
    with_one = _released(trainer, x, y, [canary], watched) * 21
    # the canary's parameter moves by exactly the clipping norm (100 times that if it escapes
    # clipping); honestly, nothing else moves (with the bug, the example that escaped clipping
    # without the canary is clipped once the canary is the largest)
    clip = trainer.dp.l2_norm_clip
    assert with_one[1] - without[1] == pytest.approx(expected * clip, abs=2e-4 * expected)
    if cls is WhiteBoxTrainer:
        np.testing.assert_allclose(with_one - without, [0.0, clip, 0.0], atol=2e-4)


def test_white_box_scores_reach_the_auditor(tmp_path):
    trainer, dataset = _trainer(WhiteBoxTrainer, noise_multiplier=1.0)
    canaries = GradientCanaries(seed=4, count=40, sink=str(tmp_path / "sink"))
    ids, coords, included = canaries.for_client(2, 1, trainer.num_parameters)
    assert list(ids) == list(range(1, 40, 2)) and len(set(canaries.coordinates(trainer.num_parameters))) == 40
    trainer.watch = (canaries, 1, 2, 3)
    result = trainer.train([np.asarray(w) for w in trainer.model.get_weights()], dataset.x_train[:64],
                           dataset.y_train[:64], 64)
    assert result.spend is not None and result.steps >= 1
    scores, files = collect(canaries)
    assert files == 1 and np.all(scores[::2] == 0) and np.all(np.isfinite(scores))
    assert np.count_nonzero(scores[1::2]) == 20


def test_shuffled_batches_hold_every_record_once_an_epoch():
    trainer, _ = _trainer(ShuffledTrainer, noise_multiplier=1.0)
    batches = list(trainer.batches(np.random.default_rng(0), 100, 0.1, 20))
    assert len(batches) == 20
    for epoch in (batches[:10], batches[10:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(100))


# ---- the command ------------------------------------------------------------------------------
# 10 clients of 450 records, Poisson batches of 45 (q = 0.1), 10 rounds of 10 steps, z = 1.5:
# accounted record-level epsilon about 3.5 (PLD, delta 1e-5).
WHITE_BOX = ["federation.num_clients=10", "federation.min_available_clients=10", "run.rounds=10",
             "secure_aggregation.enabled=false", "model.name=mlp", "client.batch_size=45",
             "dp.l2_norm_clip=1.0", "dp.noise_multiplier=1.5"]
CANARIES = "30000"


def _white_box_audit(run_dir, *extra, **bug):
    args = ("audit", str(run_dir), "--empirical", "--white-box", "--json", "--canaries", CANARIES, *extra)
    with injected.installed(**bug):
        proc = run_cli_here(*args)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)["empirical"]


@pytest.mark.slow(cost=3)
def test_white_box_audit_is_tight_on_honest_code_and_flags_halved_noise_and_skipped_clipping(tmp_path):
    run = _ledger_of(load_config(preset_layers("quickstart"), WHITE_BOX), tmp_path / "configured")
    proc, honest = _white_box_audit(run, "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    accounted = honest["accounted_epsilon"]
    print(f"white-box, honest: f-DP {honest['gdp_epsilon_lower_bound']:.2f}, Steinke et al. "
          f"{honest['epsilon_lower_bound']:.2f}, accounted {accounted:.2f}")
    assert 2 < accounted < 8 and honest["mode"] == "white-box" and honest["observations"] == 100
    assert honest["verdict"] == "consistent" and honest["claim_rejected"] is False
    # Tight: 27 honest canary runs of this configuration measured 1.60 to 2.19 (mean 1.83, spread
    # about 0.13); 0.4 of the accounted 3.54 is 1.42, three spreads below the mean.
    assert 0.4 * accounted <= honest["gdp_epsilon_lower_bound"] <= accounted
    assert honest["epsilon_lower_bound"] <= honest["gdp_epsilon_lower_bound"]
    for bug in ("half_noise", "unclipped"):
        proc, broken = _white_box_audit(run, "--seed", "3", **{bug: True})
        print(f"white-box, {bug}: f-DP {broken['gdp_epsilon_lower_bound']:.2f} vs accounted "
              f"{broken['accounted_epsilon']:.2f}")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert broken["verdict"].startswith("VIOLATION") and broken["claim_rejected"] is True
        assert broken["accounted_epsilon"] == pytest.approx(accounted)  # the ledger claims the same
        assert broken["gdp_epsilon_lower_bound"] > accounted


def test_white_box_input_errors_are_one_line(tmp_path):
    nodp = _ledger_of(load_config(preset_layers("no-dp"), WHITE_BOX), tmp_path / "nodp")
    dp = _ledger_of(load_config(preset_layers("quickstart"), WHITE_BOX), tmp_path / "dp")
    fast = _ledger_of(load_config(preset_layers("quickstart"), [*WHITE_BOX, "dp.implementation=fast"]),
                      tmp_path / "fast")
    cases = [
        (["audit", str(dp), "--white-box"], "--white-box only apply with --empirical"),
        (["audit", str(nodp), "--empirical", "--white-box"], "this run has no DP-SGD"),
        (["audit", str(fast), "--empirical", "--white-box"], "needs book-keeping DP-SGD"),
        (["audit", str(dp), "--empirical", "--white-box", "--canaries", "500000"], "exceeds the model's"),
    ]
    for args, message in cases:
        proc = run_cli_here(*args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
