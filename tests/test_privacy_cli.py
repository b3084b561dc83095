"""`fedpriv privacy`: figures checked against dp-accounting and TF Privacy called directly."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedpriv.cli import main


def _run(capsys, *args):
    code = main(["privacy", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *args):
    code, out, _ = _run(capsys, *args, "--json")
    assert code == 0
    return json.loads(out)


def test_dpsgd_mnist_scale(capsys):
    report = _json(capsys, "dpsgd", "--examples", "60000", "--batch-size", "256", "--epochs", "60",
                   "--noise", "1.1", "--delta", "1e-5")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)),
        60 * math.ceil(60000 / 256))  # the trainer's schedule: every epoch takes ceil(N/B) steps
    direct_rdp = rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    direct_pld = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-5)
    assert report["epsilon"]["rdp"] == pytest.approx(direct_rdp, rel=1e-6)
    assert report["epsilon"]["pld"] == pytest.approx(direct_pld, rel=1e-6)
    assert report["epsilon"]["rdp"] == pytest.approx(2.60, abs=0.01)
    assert report["epsilon"]["pld"] == pytest.approx(2.38, abs=0.01)
    assert report["enforcement_accountant"] == "rdp"


def test_dpsgd_counts_the_steps_the_trainer_takes(capsys):
    # N=450, B=32, E=3: the trainer takes 3 * ceil(450/32) = 45 steps, not ceil(3*450/32) = 43.
    report = _json(capsys, "dpsgd", "--examples", "450", "--batch-size", "32", "--epochs", "3",
                   "--noise", "1.0", "--delta", "1e-5")
    step = dp_accounting.PoissonSampledDpEvent(32 / 450, dp_accounting.GaussianDpEvent(1.0))
    direct = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, 45)).get_epsilon(1e-5)
    fewer = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, 43)).get_epsilon(1e-5)
    assert report["steps"] == 45
    assert report["epsilon"]["rdp"] == pytest.approx(direct, rel=1e-6)
    assert report["epsilon"]["rdp"] > fewer * (1 + 1e-3)


def test_for_random_settings_the_calculator_counts_the_steps_a_real_trainer_takes(capsys, monkeypatch):
    """Eight settings (N, B, E, z, delta) drawn at random: a real LocalTrainer trains E epochs on
    the public schedule N and its optimizer is stepped a number of times; ``fedpriv privacy dpsgd
    --json`` must report that many steps, and its epsilon must be dp-accounting's for that many
    Poisson-sampled steps at rate B/N. (The seed is printed so a failure can be replayed.)"""
    import os
    import random
    import secrets
    import sys

    import numpy as np

    from fedpriv.clients.trainer import LocalTrainer
    from fedpriv.common.config import ClientSection, DPSection, ModelSection

    seed = int(os.environ.get("FEDPRIV_TEST_SEED") or secrets.randbits(32))
    print(f"calculator vs trainer: settings drawn with FEDPRIV_TEST_SEED={seed}", file=sys.stderr)
    rng = random.Random(seed)
    for _ in range(8):
        examples, epochs = rng.randint(20, 400), rng.randint(1, 3)
        batch = rng.randint(1, min(examples, 70))
        noise, delta = round(rng.uniform(0.6, 3.0), 3), rng.choice([1e-5, 1e-6, 3e-6, 1e-7])
        trainer = LocalTrainer("mlp", ModelSection(mlp_layers=0),
                               ClientSection(batch_size=batch, local_epochs=epochs, optimizer="sgd"),
                               DPSection(noise_multiplier=noise, l2_norm_clip=1.0), (3,), 2)
        taken = []
        monkeypatch.setattr(trainer, "step", lambda x, y: taken.append(len(y)) or 0.0)
        local = rng.randint(1, 2 * examples)  # the local record count does not change the schedule
        x = np.zeros((local, 3), np.float32)
        result = trainer.train(trainer.model.get_weights(), x, np.arange(local) % 2, schedule_examples=examples)
        report = _json(capsys, "dpsgd", "--examples", str(examples), "--batch-size", str(batch), "--epochs",
                       str(epochs), "--noise", str(noise), "--delta", str(delta))
        setting = (seed, examples, batch, epochs, noise, delta)
        # Every scheduled step samples a batch; an empty one is skipped but still counted.
        assert result.steps == epochs * math.ceil(examples / batch) >= len(taken), setting
        assert report["steps"] == result.steps, setting
        step = dp_accounting.PoissonSampledDpEvent(batch / examples, dp_accounting.GaussianDpEvent(noise))
        direct = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, result.steps))
        assert report["epsilon"]["rdp"] == pytest.approx(direct.get_epsilon(delta), rel=1e-6), setting


def test_dpsgd_microbatching_and_shuffle_figures_match_tf_privacy(capsys):
    from tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib import (
        compute_dp_sgd_privacy_statement,
    )

    # N a multiple of B: TF Privacy counts ceil(E*N/B) steps, the trainer E*ceil(N/B); here they agree.
    statement = compute_dp_sgd_privacy_statement(
        number_of_examples=64000, batch_size=256, num_epochs=15, noise_multiplier=1.1,
        delta=1e-5, used_microbatching=True)
    numbers = [float(line.split()[-1]) for line in statement.splitlines()
               if line.strip().startswith("Epsilon")]
    once_per_epoch, poisson = numbers[:2]
    report = _json(capsys, "dpsgd", "--examples", "64000", "--batch-size", "256", "--epochs", "15",
                   "--noise", "1.1", "--delta", "1e-5", "--microbatches", "32")
    assert report["effective_noise_multiplier"] == pytest.approx(0.55)
    assert report["epsilon"]["rdp"] == pytest.approx(poisson, abs=1e-3)
    assert report["epsilon_without_amplification"] == pytest.approx(once_per_epoch, abs=1e-3)


def test_dpfedavg_poisson(capsys):
    report = _json(capsys, "dpfedavg", "--population", "1000", "--clients-per-round", "100",
                   "--rounds", "100", "--noise", "1.0", "--delta", "1e-3")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert report["epsilon"]["rdp"] == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(1e-3), rel=1e-6)
    assert report["epsilon"]["rdp"] == pytest.approx(5.66, abs=0.01)
    assert report["epsilon"]["pld"] == pytest.approx(4.78, abs=0.01)


def test_dpfedavg_fixed_and_none(capsys):
    fixed = _json(capsys, "dpfedavg", "--population", "1000", "--clients-per-round", "100",
                  "--rounds", "100", "--noise", "1.0", "--delta", "1e-4", "--sampling", "fixed")
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        # replace-one adjacency: the clipped sum's sensitivity is 2C, so z / 2 relative to it
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, dp_accounting.GaussianDpEvent(0.5)), 100))
    assert fixed["epsilon"]["rdp"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)
    assert fixed["epsilon"]["pld"] is None  # dp-accounting's PLD cannot analyse this sampling
    assert fixed["neighboring_relation"] == "replace_one"

    none = _json(capsys, "dpfedavg", "--population", "1000", "--clients-per-round", "100",
                 "--rounds", "100", "--noise", "1.0", "--delta", "1e-4", "--sampling", "none")
    direct = rdp.RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 100)).get_epsilon(1e-4)
    assert none["epsilon"]["rdp"] == pytest.approx(direct, rel=1e-6)


def test_target_epsilon_inverts(capsys):
    report = _json(capsys, "dpsgd", "--examples", "60000", "--batch-size", "256", "--epochs", "60",
                   "--target-epsilon", "2.0", "--delta", "1e-5")
    z = report["noise_multiplier"]["rdp"]
    again = _json(capsys, "dpsgd", "--examples", "60000", "--batch-size", "256", "--epochs", "60",
                  "--noise", str(z), "--delta", "1e-5")
    assert again["epsilon"]["rdp"] == pytest.approx(2.0, abs=0.01)
    assert again["epsilon"]["rdp"] <= 2.0 + 1e-6
    assert report["noise_multiplier"]["pld"] < z  # PLD is tighter, so it needs less noise


def test_text_output_names_both_accountants(capsys):
    code, out, _ = _run(capsys, "dpsgd", "--examples", "1000", "--batch-size", "50", "--epochs", "2",
                        "--noise", "1.0", "--delta", "1e-5")
    assert code == 0 and "RDP" in out and "PLD" in out and "enforcement" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["dpsgd", "--examples", "100", "--batch-size", "10", "--epochs", "1", "--noise", "-1", "--delta", "1e-5"],
         "--noise must be >= 0"),
        (["dpsgd", "--examples", "100", "--batch-size", "10", "--epochs", "1", "--noise", "1", "--delta", "1.5"],
         "--delta must be in (0, 1)"),
        (["dpfedavg", "--population", "10", "--clients-per-round", "20", "--rounds", "1", "--noise", "1",
          "--delta", "1e-5"], "--clients-per-round must be between 1 and --population"),
    ],
)
def test_bad_input(capsys, args, fragment):
    code, out, err = _run(capsys, *args)
    assert code == 2 and err.strip().startswith("error:") and fragment in err
    assert "Traceback" not in err


def test_delta_too_large_for_the_population_warns(capsys):
    code, _, err = _run(capsys, "dpfedavg", "--population", "100", "--clients-per-round", "10",
                        "--rounds", "5", "--noise", "1", "--delta", "0.05")
    assert code == 0 and "warning: delta 0.05 >= 1/population" in err


DRAWS = 3  # random settings, each one real federation


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(DRAWS))
def test_the_calculator_gives_the_epsilon_a_real_simulation_records(draw, tmp_path, capsys):
    """``fedpriv privacy dpsgd --json`` against what a real ``fedpriv simulate`` records for each
    client, for a setting (N, B, E, z, delta) drawn at random (a fresh seed for each draw; set
    FEDPRIV_TEST_SEED to replay one): after round r the client has trained r*E epochs over its
    public schedule size N, so the calculator with ``--epochs r*E`` must agree."""
    import os
    import random
    import secrets
    import sys

    from fedpriv.common.ledger import verify_ledger
    from tests.conftest import simulate_run

    seed = int(os.environ.get("FEDPRIV_TEST_SEED") or secrets.randbits(32))
    print(f"calculator vs simulate: setting drawn with FEDPRIV_TEST_SEED={seed}", file=sys.stderr)
    rng = random.Random(seed)
    examples = rng.randint(150, 500)  # client.schedule_examples: the N every client's schedule uses
    batch = rng.choice([16, 24, 32, 40, 64])
    epochs = rng.randint(1, 2)
    while examples % batch == 0:  # a setting where ceil(E*N/B) and E*ceil(N/B) can differ
        examples = rng.randint(150, 500)
    noise = round(rng.uniform(0.7, 2.0), 3)
    delta = rng.choice([1e-5, 1e-6, 3e-6])
    rounds = 2
    proc, summary = simulate_run(tmp_path / "run", [
        "data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", "run.rounds=2",
        "federation.num_clients=2", "federation.min_available_clients=2", "federation.min_train_clients=2",
        "secure_aggregation.enabled=false", f"client.schedule_examples={examples}",
        f"client.batch_size={batch}", f"client.local_epochs={epochs}", f"dp.noise_multiplier={noise}",
        "dp.microbatches=0", f"privacy.delta={delta}",
    ], here=True)
    assert proc.returncode == 0, (seed, proc.stderr[-3000:])
    capsys.readouterr()  # (each assertion below names the seed)
    entries = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "record_level"]
    assert sorted({e["actor"] for e in entries}) == ["client:0", "client:1"]
    for r in range(1, rounds + 1):
        code, out, _ = _run(capsys, "dpsgd", "--examples", str(examples), "--batch-size", str(batch),
                            "--epochs", str(r * epochs), "--noise", str(noise), "--delta", str(delta), "--json")
        assert code == 0, seed
        calculated = json.loads(out)["epsilon"]["rdp"]
        recorded = [e["epsilon"]["rdp"] for e in entries if e["round"] == r]
        assert len(recorded) == 2 and recorded == pytest.approx([calculated] * 2, rel=1e-9), (seed, r, recorded)
        # ...and both are dp-accounting's figure for r*E*ceil(N/B) Poisson-sampled steps.
        step = dp_accounting.PoissonSampledDpEvent(batch / examples, dp_accounting.GaussianDpEvent(noise))
        steps = r * epochs * math.ceil(examples / batch)
        direct = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, steps)).get_epsilon(delta)
        assert calculated == pytest.approx(direct, rel=1e-6), seed
    assert summary["privacy"]["record_level"]["max_epsilon"] == pytest.approx(calculated, rel=1e-9), seed
