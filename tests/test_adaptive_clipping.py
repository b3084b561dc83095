"""Adaptive clipping for user-level DP (user_dp.adaptive_clipping; common/user_dp.py), checked against
TF Privacy's QuantileAdaptiveClipSumQuery and dp-accounting, and end to end under SecAgg+."""

from __future__ import annotations

import csv
import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedpriv.common import user_dp
from fedpriv.common.config import ConfigError, load_config
from fedpriv.common.ledger import verify_ledger
from fedpriv.common.presets import preset_layers
from tests.conftest import run_harness, simulate_run

ADAPTIVE = ["user_dp.enabled=true", "user_dp.adaptive_clipping=true"]


def _tf_privacy_query(clip: float, z: float, count_stddev: float, expected: float):
    from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery

    return QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=clip, noise_multiplier=z, target_unclipped_quantile=0.5, learning_rate=0.2,
        clipped_count_stddev=count_stddev, expected_num_records=expected, geometric_update=True)


def _tf_privacy_round(query, state, records):
    import tensorflow as tf

    params = query.derive_sample_params(state)
    sample = query.initial_sample_state(tf.constant(records[0], tf.float32))
    for record in records:
        sample = query.accumulate_record(params, sample, tf.constant(record, tf.float32))
    return query.get_noised_result(sample, state)


def test_the_clip_follows_tf_privacys_quantile_adaptive_clip_sum_query():
    """Clients encode (clip, add the clipped-or-not value), the server releases: the sum and the
    next clip are TF Privacy's for the same update norms, round after round (noise off)."""
    cfg = load_config(overrides=[*ADAPTIVE, "user_dp.noise_multiplier=0", "user_dp.clipped_count_stddev=1e-12",
                                 "secure_aggregation.enabled=false", "user_dp.clipping_norm=1.0"])
    rng = np.random.default_rng(7)
    directions = rng.normal(size=(9, 6))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    server = user_dp.CentralGaussian(cfg, 6)
    query = _tf_privacy_query(1.0, 0.0, 1e-12, 9)
    state = query.initial_global_state()
    for norms in ([0.3, 0.8, 1.5, 2.0, 0.1, 3.0, 0.9, 1.2, 0.5], [0.2, 0.4, 0.6, 0.7, 0.95, 1.1, 1.3, 2.5, 0.05]):
        updates = [d * n for d, n in zip(directions, norms, strict=True)]
        sent = [user_dp.noise_for(cfg, 6, clip=server.clip).encode([u], 9)[0] for u in updates]
        assert sorted(float(s[1][0]) for s in sent) == sorted(0.5 if n <= server.clip else -0.5 for n in norms)
        mean = [np.mean([s[k] for s in sent], axis=0) for k in range(2)]
        update, count = server.split(mean)
        release = server.release(update, 9, 9, population=9, expected=9, count=count)
        result, state, event = _tf_privacy_round(query, state, updates)
        np.testing.assert_allclose(release.noisy_sum[0], result.numpy(), rtol=1e-5, atol=1e-7)
        assert server.clip == pytest.approx(float(state.sum_state.l2_norm_clip), rel=1e-5)
        assert release.parameters["next_clipping_norm"] == server.clip


def test_the_round_event_is_tf_privacys_and_costs_the_configured_epsilon():
    """The round's event composes the sum's and the count's Gaussians as TF Privacy reports them,
    and (their noise sized as TensorFlow Federated sizes it) costs what a fixed clip at
    user_dp.noise_multiplier costs, by dp-accounting."""
    cfg = load_config(preset_layers("cross-device"),
                      ["user_dp.adaptive_clipping=true", "secure_aggregation.enabled=false"])
    noise = user_dp.CentralGaussian(cfg, 1000)
    event = noise.round_event(population=1000, expected=50)
    z_sum, z_count = noise.multipliers(50)
    assert z_count == pytest.approx(50 / 20 / 0.5)  # Andrew et al.'s count noise, sensitivity 1/2
    assert z_sum ** -2 + z_count ** -2 == pytest.approx(cfg.user_dp.noise_multiplier ** -2)
    query = _tf_privacy_query(1.0, z_sum, 50 / 20, 50)
    _, _, tfp_event = _tf_privacy_round(query, query.initial_global_state(), [np.ones(3, np.float32)])
    assert isinstance(event, dp_accounting.PoissonSampledDpEvent) and event.sampling_probability == 0.05
    assert isinstance(event.event, dp_accounting.ComposedDpEvent) and isinstance(tfp_event, dp_accounting.ComposedDpEvent)
    assert [float(e.noise_multiplier) for e in event.event.events] == pytest.approx(
        [float(e.noise_multiplier) for e in tfp_event.events], rel=1e-6)
    adaptive = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, 200)).get_epsilon(1e-5)
    fixed = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(cfg.user_dp.noise_multiplier)),
        200)).get_epsilon(1e-5)
    assert adaptive == pytest.approx(fixed, rel=1e-6)


def test_settings_that_cannot_work_are_refused_before_any_round(cli_here, tmp_path):
    with pytest.raises(ConfigError, match="needs user-level DP"):
        load_config(overrides=["user_dp.adaptive_clipping=true"])
    with pytest.raises(ConfigError, match="clipping_range >= 0.5"):
        load_config(overrides=[*ADAPTIVE, "secure_aggregation.clipping_range=0.25"])
    # 10 clients, all sampled: Andrew et al.'s count noise (10/20) cannot compose to z = 1.
    out = tmp_path / "run"
    proc = cli_here("simulate", "--set", "user_dp.enabled=true", "--set", "user_dp.adaptive_clipping=true",
                    "--out", str(out))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: adaptive clipping: the count's noise multiplier 1") and "clipped_count_stddev above 0.5" in line
    assert not out.exists()


def test_a_clients_update_must_carry_one_clipped_or_not_value():
    from fedpriv.common.updates import individual_problem

    cfg = load_config(overrides=[*ADAPTIVE, "user_dp.clipping_norm=1.0"])
    shapes = [(3,)]
    assert individual_problem(cfg, [np.full(3, 0.1), np.array([0.5])], shapes, 1.0) is None
    for bad in ([np.full(3, 0.1)], [np.full(3, 0.1), np.array([0.7])], [np.full(3, 0.1), np.array([0.5, 0.5])]):
        assert "clipped-or-not" in individual_problem(cfg, bad, shapes, 1.0)
    assert "norm" in individual_problem(cfg, [np.full(3, 1.0), np.array([0.5])], shapes, 1.0)  # over the round's clip
    assert individual_problem(cfg, [np.full(3, 1.0), np.array([-0.5])], shapes, 2.0) is None
    # Distributed noise: the value is already scaled and noised, one finite integer.
    cfg = _distributed()
    assert individual_problem(cfg, [np.full(3, 7.0), np.array([-524287.0])], shapes) is None
    for bad in ([np.full(3, 7.0), np.array([0.5])], [np.full(3, 7.0), np.array([np.inf])], [np.full(3, 7.0)]):
        assert "clipped-or-not" in individual_problem(cfg, bad, shapes)


class _Node:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


@pytest.mark.parametrize("count", [np.array([0.5, 0.5]), np.array([np.nan]), np.zeros((1, 1))])
def test_an_unmasked_sum_whose_count_is_malformed_fails_the_round_and_keeps_the_model(tmp_path, own_server_state,
                                                                                    count):
    """Under SecAgg+ the server sees only the unmasked mean; if its clipped-or-not part is not one
    finite number (a client that skipped its own check, say), the round fails cleanly: no noise is
    drawn on it, no clip moves, the global model stays, and the server carries on."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedpriv.server.privacy import PrivacyRecorder
    from fedpriv.server.run_log import RunLog
    from fedpriv.server.strategy import FedprivStrategy

    cfg = load_config(overrides=[*ADAPTIVE, "user_dp.clipping_norm=1.0", "federation.num_clients=3",
                                 "federation.min_available_clients=3", "federation.min_train_clients=3"])
    initial = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    run_log = RunLog()
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, initial, run_log, recorder, lambda r, w: (0.0, 0.0))
    clip = strategy.user_noise.clip
    strategy.rounds[1].plan(3, 3.0)
    strategy.rounds[1].sampled = {1, 2, 3}
    # What SecAggPlusWorkflow hands every result: the same unmasked mean (model arrays, then the count).
    mean = ndarrays_to_parameters([np.full((2, 3), 0.1, np.float32), np.full(3, 0.1, np.float32),
                                   count.astype(np.float32)])
    results = [(_Node(n), FitRes(Status(Code.OK, "ok"), mean, 1, {})) for n in (1, 2, 3)]
    assert strategy.aggregate_fit(1, results, [])[0] is None
    assert strategy.rounds[1].failed == ("the aggregated update is malformed (its clipped-or-not count is "
                                         "not one finite number)")
    assert [np.count_nonzero(a) for a in strategy.latest] == [0, 0]
    assert strategy.user_noise.clip == clip
    recorder.finish()


def _distributed(*extra: str):
    return load_config(preset_layers("cross-device"),
                       ["user_dp.adaptive_clipping=true", "user_dp.noise_mode=distributed", *extra])


def _encode_round(cfg, server, updates, sampled):
    """Each client encodes its update at the server's clip; the mean SecAgg+ would unmask, split."""
    dimension = updates[0].size
    sent = [user_dp.noise_for(cfg, dimension, clip=server.clip).encode([u], sampled)[0] for u in updates]
    return server.split([np.mean([s[k] for s in sent], axis=0) for k in range(2)]), sent


def test_with_distributed_noise_the_clip_still_follows_tf_privacys_query():
    """Noise off: the clients send integers (the clipped-or-not value on its own scale, last),
    and the decoded sum and the next clip are TF Privacy's for the same update norms."""
    cfg = _distributed("user_dp.noise_multiplier=0", "user_dp.clipped_count_stddev=1e-12", "user_dp.clipping_norm=1.0")
    rng = np.random.default_rng(11)
    directions = rng.normal(size=(9, 6))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    server = user_dp.noise_for(cfg, 6)
    assert server.mode == "distributed" and server.adaptive
    query = _tf_privacy_query(1.0, 0.0, 1e-12, 9)
    state = query.initial_global_state()
    for norms in ([0.3, 0.8, 1.5, 2.0, 0.1, 3.0, 0.9, 1.2, 0.5], [0.2, 0.4, 0.6, 0.7, 0.95, 1.1, 1.3, 2.5, 0.05]):
        updates = [d * n for d, n in zip(directions, norms, strict=True)]
        (update, count), sent = _encode_round(cfg, server, updates, 9)
        assert all(np.array_equal(a, np.rint(a)) for s in sent for a in s)  # integers, value included
        release = server.release(update, 9, 9, population=1000, expected=9, count=count)
        result, state, _ = _tf_privacy_round(query, state, updates)
        np.testing.assert_allclose(release.noisy_sum[0], result.numpy(), atol=1e-5)
        assert server.clip == pytest.approx(float(state.sum_state.l2_norm_clip), rel=1e-5)
        assert release.parameters["clipping_norm"] != release.parameters["next_clipping_norm"] == server.clip


def test_with_distributed_noise_the_round_composes_two_zcdp_bounds_at_the_configured_cost():
    """The sum's and the count's discrete Gaussians each get the paper's bound (recomputed here),
    the round's event is their composition, dp-accounting gives it about the epsilon of a fixed
    clip at user_dp.noise_multiplier, and the bound before a round covers it."""
    from tests.test_distributed_dp_bound import _paper_rho

    cfg, d, sampled, contributors = _distributed(), 1000, 104, 101
    server = user_dp.noise_for(cfg, d)
    z, expected = cfg.user_dp.noise_multiplier, user_dp.expected_clients(cfg)
    z_sum, z_count = server.multipliers()
    assert expected == 100 and z_count == pytest.approx(expected / 20 / 0.5) and z_sum ** -2 + z_count ** -2 == pytest.approx(z ** -2)
    rng = np.random.default_rng(5)
    updates = [rng.normal(size=d) * rng.uniform(0.01, 0.1) for _ in range(contributors)]
    (update, count), _ = _encode_round(cfg, server, updates, sampled)
    release = server.release(update, contributors, sampled, population=1000, expected=expected, count=count)
    p = release.parameters
    l2 = cfg.user_dp.clipping_norm * p["scale"] + math.sqrt(d)
    rho_sum, _ = _paper_rho(l2, l2 * min(math.sqrt(d), l2), p["local_std"], contributors, d)
    l2_count = 0.5 * p["count_scale"] + 1
    rho_count, _ = _paper_rho(l2_count, l2_count, p["count_local_std"], contributors, 1)
    assert isinstance(release.event, dp_accounting.ComposedDpEvent) and release.sampling == "none"
    assert [e.rho for e in release.event.events] == pytest.approx([rho_sum, rho_count], rel=1e-9)
    assert p["zcdp_rho"] == pytest.approx(rho_sum + rho_count, rel=1e-12)
    assert 0 < release.delta_addition < 1e-12
    fixed_cfg = load_config(preset_layers("cross-device"), ["user_dp.noise_mode=distributed"])
    fixed = user_dp.noise_for(fixed_cfg, d).release([u * 0 for u in update], contributors, sampled, 1000, expected)

    def eps(event):
        return rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, 20)).get_epsilon(1e-5)

    assert eps(release.event) == pytest.approx(eps(fixed.event), rel=0.01)
    worst, addition = server.bound_before_round(1000, expected)
    assert sum(e.rho for e in worst.events) >= p["zcdp_rho"] and addition >= release.delta_addition
    assert server.skipped(1000, expected).noise_multiplier == pytest.approx((2 * sum(e.rho for e in worst.events)) ** -0.5)


def test_a_distributed_adaptive_ledger_replays_in_the_audit(tmp_path, own_server_state):
    """Rounds released through the server strategy: each ledger entry's event replays, in the
    audit and in dp-accounting called here on the composed zCDP events, to the recorded epsilon;
    each round starts from the clip the last one left."""
    from fedpriv.common.audit import audit_run
    from fedpriv.server.privacy import PrivacyRecorder
    from fedpriv.server.run_log import RunLog
    from fedpriv.server.strategy import FedprivStrategy

    cfg, d = _distributed(), 200
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    log = RunLog()
    strategy = FedprivStrategy(cfg, [np.zeros(d, dtype=np.float32)], log, recorder, lambda r, w: (0.0, 0.0))
    rng = np.random.default_rng(3)
    for rnd in (1, 2, 3):
        sampled = 95 + rnd
        strategy.rounds[rnd].plan(1000, 100.0)
        strategy.rounds[rnd].sampled = set(range(sampled))
        updates = [rng.normal(size=d) * rng.uniform(0.5, 3.0) / math.sqrt(d) for _ in range(sampled)]
        (update, count), _ = _encode_round(cfg, strategy.user_noise, updates, sampled)
        strategy._privatize(rnd, update, sampled, count)
    figures = recorder.finish()
    entries = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "user_level"]
    accountant, overflow = rdp.RdpAccountant(), 0.0
    for entry in entries:
        p = entry["parameters"]
        accountant.compose(dp_accounting.ComposedDpEvent([dp_accounting.ZCDpEvent(p["sum_zcdp_rho"]),
                                                          dp_accounting.ZCDpEvent(p["count_zcdp_rho"])]))
        overflow += p["delta_addition"]
        assert entry["epsilon"]["rdp"] == pytest.approx(accountant.get_epsilon(1e-5 - overflow), rel=1e-9)
    for before, after in zip(entries, entries[1:]):
        assert after["parameters"]["clipping_norm"] == before["parameters"]["next_clipping_norm"]
    assert len({e["parameters"]["clipping_norm"] for e in entries}) == 3
    assert [log.entry(r).clipping_norm for r in (1, 2, 3)] == [e["parameters"]["clipping_norm"] for e in entries]
    report = audit_run(tmp_path / "run")
    assert report["epsilon"]["user_level"]["rdp"] == pytest.approx(figures["user_level"]["rdp"], rel=1e-9)
    assert figures["user_level"]["rdp"] == pytest.approx(entries[-1]["epsilon"]["rdp"], rel=1e-9)
    assert not [f for f in report["failures"] if "epsilon" in f], report["failures"]


SMALL_CROSS_DEVICE = ["federation.num_clients=100", "federation.min_available_clients=100",
                      "federation.fraction_train=0.2", "user_dp.adaptive_clipping=true", "user_dp.clipping_norm=0.5",
                      "user_dp.noise_multiplier=1.0", "client.local_epochs=1"]


@pytest.mark.slow
def test_an_adaptive_run_is_accounted_audited_plotted_and_resumed(cli_here, tmp_path, own_server_state):
    """Cross-device under SecAgg+: each round's ledger event is the sampled composition of the
    sum's and the count's Gaussians; dp-accounting called on those events gives the recorded
    epsilon and the audit's; metrics.csv has each round's clip; a resume continues from the clip
    the last round left, not from the configured one."""
    out = tmp_path / "run"
    proc, summary = simulate_run(out, ["run.rounds=2", *SMALL_CROSS_DEVICE], "cross-device", here=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, summary = simulate_run(out, ["run.rounds=3"], resume=True, here=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = [e for e in verify_ledger(out).entries if e["kind"] == "user_level"]
    assert [e["round"] for e in entries] == [1, 2, 3]
    accountant, clips = rdp.RdpAccountant(), []
    for entry in entries:
        p = entry["parameters"]
        assert p["secure_aggregation"] and p["noise_multiplier"] == 1.0
        assert p["clipped_count_stddev"] == pytest.approx(20 / 20)
        assert p["sum_noise_multiplier"] ** -2 + p["count_noise_multiplier"] ** -2 == pytest.approx(1.0, rel=1e-4)
        assert p["next_clipping_norm"] == pytest.approx(
            p["clipping_norm"] * math.exp(-0.2 * (p["unclipped_fraction"] - 0.5)))
        clips.append(p["clipping_norm"])
        accountant.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(p["sum_noise_multiplier"]),
            dp_accounting.GaussianDpEvent(p["count_noise_multiplier"])])))
    assert clips[0] == 0.5
    for before, after in zip(entries, entries[1:]):  # round 3 ran in the resumed process
        assert after["parameters"]["clipping_norm"] == before["parameters"]["next_clipping_norm"]
    epsilon = accountant.get_epsilon(1e-5)
    assert summary["privacy"]["user_level"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert entries[-1]["epsilon"]["rdp"] == pytest.approx(epsilon, rel=1e-9)
    audit = cli_here("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:]
    assert json.loads(audit.stdout)["epsilon"]["user_level"]["rdp"] == pytest.approx(epsilon, rel=1e-9)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["clipping_norm"]) for r in rows] == pytest.approx(clips)
    assert (out / "progress.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("noise_mode", ["central", "distributed"])
def test_the_clipped_or_not_values_reach_the_server_only_inside_the_masked_sum(tmp_path, own_server_state,
                                                                               noise_mode):
    """The server's view of a SecAgg+ round (tests/secagg_harness.py): each reply's masked vector
    ends with the client's clipped-or-not value masked beyond recognition, no reply carries it
    otherwise, and only the unmasked sum gives the count (noise off here, so it is exact; the
    run's infinite user-level epsilon stays in its own server state, which later runs do not
    compose with). With distributed noise the value travels as its own scaled integer."""
    settings = ["run.rounds=1", "federation.num_clients=5", "federation.min_available_clients=5",
                *ADAPTIVE, "user_dp.noise_multiplier=0", "user_dp.clipped_count_stddev=1e-9",
                "user_dp.clipping_norm=0.05", f"user_dp.noise_mode={noise_mode}"]
    proc = run_harness("secagg_harness", str(tmp_path), *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    view = np.load(tmp_path / "server-view.npz")
    flags = {}
    for c in range(5):
        sent = np.load(tmp_path / "updates" / f"update-{c}.npz")["update"]  # what the client masked
        masked = view[f"masked_{c}"]
        assert masked.size == sent.size + 1  # Flower's weight factor first, the value last
        if noise_mode == "distributed":  # integers: Flower's quantizer shifts them by half its range
            assert sent[-1] == round(sent[-1]) and abs(sent[-1]) > 2**18
            flags[c] = 0.5 if sent[-1] > 0 else -0.5
            quantized = int(sent[-1]) + 2**21
        else:
            flags[c], norm = sent[-1], float(np.linalg.norm(sent[:-1]))
            assert flags[c] in (0.5, -0.5)
            assert (norm < 0.05) if flags[c] == 0.5 else norm == pytest.approx(0.05, rel=1e-6)
            quantized = round((flags[c] + 8.0) * 2**22 / 16.0)  # Flower's quantizer at SecAgg+'s settings
        distance = (int(masked[-1]) - quantized) % 2**32
        assert min(distance, 2**32 - distance) > 1000  # not the value, nor anywhere near it
        assert int(view[f"plain_arrays_{c}"]) == 0  # no plain update beside the masked one
    (entry,) = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "user_level"]
    assert entry["parameters"]["noise_mode"] == noise_mode
    unclipped = sum(f == 0.5 for f in flags.values()) / 5
    assert entry["parameters"]["unclipped_fraction"] == pytest.approx(unclipped, abs=1e-4)
