"""The benchmark harness's quick mode runs end to end, so the benchmarks cannot rot.

Timings on a shared 2-core machine are noisy, so only what always holds is checked: the results
file has the expected shape, every ratio is a positive number, and on the seed CNN per-example
clipping with one microbatch per example (the textbook baseline) is slower than non-private
training (by about 10x at the quick mode's batch of 16 and two timed rounds; on the small MLP the
gap is small enough for noise to blur it, so it is not asserted there). The one-command harness (run_all.py) runs its
quick mode too: its summary, and the plain-Flower comparison's results, have their shape. The
harness's quick mode runs dp_step's and flower_baseline's quick modes itself, so one test checks all
three from one run of it instead of running each twice. The scale benchmark runs its quick mode on
its own: its results have their shape, and client state is created only for clients that trained.
The SecAgg+ benchmark's breakdown of a round into message exchanges is checked on its own (its
quick mode runs six simulations, about two minutes), and so is dp_step's fixed-noise variant: it
adds its noise pool and never draws.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from fedpriv.clients.trainer import choose_implementation
from fedpriv.common.config import DPSection
from tests.conftest import ROOT, task_identity


VARIANTS = ("nonprivate", "textbook", "vectorized", "fast", "bookkeeping", "default", "clipping_only",
            "fixed_noise", "noise_draw")
RATIOS = ("textbook_ratio", "vectorized_ratio", "fast_ratio", "bookkeeping_ratio", "default_ratio",
          "clipping_only_ratio", "fixed_noise_ratio", "noise_draw_ratio")


# Trainable weights, counted by hand from the layers (common/models.py), 28x28x1 input, 10 classes:
# Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10 (3x3 kernels: 28 -> 26 -> 13 -> 11 -> 5 -> 3),
# and the MLP's Dense128-Dense128-Dense10 on 784 pixels.
CNN_WEIGHTS = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) + (3 * 3 * 64 * 64 + 64) + (64 * 10 + 10)
MLP_WEIGHTS = (784 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)


def run_all_quick(out):
    """``benchmarks/run_all.py --quick`` (dp_step --quick --device cpu, then flower_baseline
    --quick): its process and output folder."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    return proc, out


@pytest.mark.slow(cost=3)
def test_run_all_quick_with_dp_step_and_flower_baseline(tmp_path):
    """One run of the harness's quick mode serves every check: dp_step's results, the plain-Flower
    comparison's, then the harness's summary."""
    proc, tmp_path = run_all_quick(tmp_path)
    check_dp_step(proc, tmp_path)
    check_flower_baseline(proc, tmp_path)
    check_run_all(proc, tmp_path)


def check_flower_baseline(proc, tmp_path):
    """Plain Flower, fedpriv no-dp and the quickstart each ran (3 clients, 2 rounds) and were timed
    per round; the ratios are positive and both no-DP runs learned."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "flower_baseline.json").read_text())
    assert sorted(r["kind"] for r in results["runs"]) == ["fedpriv no-dp", "fedpriv quickstart", "plain"]
    for key in ("ratio", "round_ratio", "quickstart_ratio"):
        assert math.isfinite(results[key]) and results[key] > 0, (key, results[key])
    assert results["accuracy"]["plain"] > 0.5 and results["accuracy"]["fedpriv no-dp"] > 0.5
    assert results["quickstart_record_epsilon"] > 0
    assert results["settings"]["cpus_per_client"] == (os.cpu_count() or 1)  # one Ray worker a quick run
    assert "| plain Flower 1.42" in (tmp_path / "flower_baseline.md").read_text()


@pytest.mark.slow(cost=2)
def test_scale_quick(tmp_path):
    """The scale benchmark's quick mode: populations 100 and 1,000, 3 clients a round, 2 rounds."""
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_scale(tmp_path, 42)  # scale.py's default seed


def check_dp_step(proc, tmp_path):
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "dp_step.json").read_text())
    assert (tmp_path / "dp_step.md").read_text().count("| cnn |") == len(VARIANTS)
    # the table dp_step prints (the harness relays it under "## dp_step")
    assert "| variant |" in proc.stdout.split("## dp_step", 1)[1]

    assert results["quick"] is True and results["complete"] is True and results["device"] == "cpu"
    assert isinstance(results["seed"], int)
    assert results["versions"]["tensorflow"] and results["versions"]["tensorflow-privacy"]
    assert results["machine"]["cpus"] >= 1
    for model in ("cnn", "mlp"):
        assert set(results[model]) == {str(b) for b in results["settings"]["batch_sizes"]}
        for entry in results[model].values():
            for key in RATIOS:
                assert math.isfinite(entry[key]) and entry[key] > 0, (model, key, entry[key])
            assert set(entry["examples_per_s"]) == set(VARIANTS)
            assert entry["examples_per_s"]["noise_draw"] is None  # it trains on nothing
            assert all(v > 0 for k, v in entry["examples_per_s"].items() if k != "noise_draw")
            # one step's noise: a normal for every trainable weight of the model
            assert entry["noise_draw_normals"] == {"cnn": CNN_WEIGHTS, "mlp": MLP_WEIGHTS}[model]
            # "default" is what a client with the default [dp] section runs
            assert entry["default_implementation"] == choose_implementation(DPSection())
    for entry in results["cnn"].values():
        assert entry["textbook_ratio"] > 1, entry


def check_run_all(proc, tmp_path):
    """The one-command harness in quick mode: dp_step and flower_baseline, then the summary with
    machine, versions, seed and targets."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    report = (tmp_path / "summary.md").read_text()
    assert "| benchmark | figure | measured | target | result |" in proc.stdout
    assert "## dp_step" in report and "## flower_baseline" in report and "| plain Flower 1.42" in report
    assert summary["quick"] is True and isinstance(summary["seed"], int)
    assert summary["benchmarks"] == ["dp_step", "flower_baseline"]
    assert all(r["exit_code"] == 0 for r in summary["runs"])
    assert summary["versions"]["flwr"] and summary["versions"]["tensorflow"]
    assert summary["machine"]["cpus"] >= 1
    assert {f["benchmark"] for f in summary["figures"]} == {"dp_step", "flower_baseline", "harness"}
    assert json.loads((tmp_path / "dp_step.json").read_text())["complete"] is True


def check_scale(tmp_path, seed):
    results = json.loads((tmp_path / "scale.json").read_text())
    assert list(results["series"]) == ["3"] and results["seed"] == seed
    scale = results["series"]["3"]
    assert set(scale["populations"]) == {"100", "1000"} and scale["compared"] == [100, 1000]
    for key in ("rss_ratio", "pss_ratio", "round_time_ratio"):
        assert math.isfinite(scale[key]) and scale[key] > 0, (key, scale[key])
    rounds = results["settings"]["rounds"]
    for population in scale["populations"].values():
        (run,) = population["runs"]
        assert run["clients_trained"] == [3] * rounds and run["failed_rounds"] == 0
        assert population["peak_rss_bytes"] > 0 and population["median_round_s"] > 0
        # client state is created when a client trains, not for the whole population
        assert run["node_dirs"] <= 3 * rounds
    # a loose guard (the full run's target is 1.2x): per-client state created eagerly for
    # 1,000 clients would show here
    assert scale["rss_ratio"] < 1.5
    assert (tmp_path / "scale.png").stat().st_size > 0


@pytest.mark.slow
def test_secagg_hardening_quick(tmp_path):
    """Stock Flower SecAgg+ and fedpriv's hardened rounds both complete (the benchmark exits
    non-zero otherwise) and give a positive ratio, protocol only and with local training."""
    proc = subprocess.run([sys.executable, "benchmarks/secagg_hardening.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "secagg_hardening.json").read_text())["rows"]
    assert [(r["kind"], r["clients"]) for r in rows] == [("protocol only", 10), ("round", 10)]
    assert all(r["ratio"] > 0 and math.isfinite(r["ratio"]) for r in rows)
    assert "| round | 10 |" in (tmp_path / "secagg_hardening.md").read_text()


def test_secagg_breakdown_names_exchanges_and_bounds_the_ratio():
    """The SecAgg+ benchmark's timer names each exchange by Flower's SecAgg+ stage (else by the
    message type), and the floor ratio adds three unmasking exchanges to the plain round."""
    from flwr.common import ConfigRecord, Message, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import exchange_timer
        import secagg
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with task_identity():
        setup = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP})}), dst_node_id=1,
                        message_type="train")
        plain = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=1, message_type="train")
    assert (exchange_timer.exchange_name(setup), exchange_timer.exchange_name(plain)) == ("setup", "train")

    timings = exchange_timer.Timings()
    for server_round, unmask in ((1, 5.0), (2, 0.2), (3, 0.4)):  # the first round's start-up is left out
        for stage in secagg.STAGES:
            timings.exchange(server_round, stage, unmask if stage == "unmask" else 1.0)
            timings.stages[stage].append((unmask if stage == "unmask" else 1.0) + 0.5)
    timings.exchange(None, "train", 9.0)  # a message of no round is not counted
    plain_timings = {"exchanges": {"1": {"train": 3.0}, "2": {"train": 1.0}, "3": {"train": 2.0}}, "stages": {}}
    row = secagg.breakdown(json.loads(json.dumps(timings.as_json())), plain_timings, plain_round_s=2.0)
    assert row["plain_train_exchange_s"] == 1.5
    assert row["secagg_exchange_s"]["unmask"] == pytest.approx(0.3)
    assert row["secagg_stage_s"]["setup"] == 1.5
    assert row["floor_ratio"] == pytest.approx((2.0 + 3 * 0.3) / 2.0)
    table = secagg.breakdown_table([{"model": "m", "clients": 2, "ratio": 1.7, **row}])
    assert "| m | 2 | 1.500 | 1.000 | 1.000 | 1.000 | 0.300 | 2.000 | 1.45 | 1.70 |" in table


def test_the_fixed_noise_variant_adds_its_pool_and_draws_nothing(monkeypatch):
    """dp_step's ``fixed_noise`` trainer steps with its noise pool refilled from zeros, and never
    reaches the CSPRNG sampler (whose time is what the variant leaves out)."""
    import numpy as np

    from fedpriv.common import entropy

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import dp_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    trainer = dp_step.build("fixed_noise", "mlp", 8)
    dp_step.draw_nothing(trainer)

    def no_draws(*args, **kwargs):
        raise AssertionError("the fixed_noise variant drew normals")

    monkeypatch.setattr(entropy, "standard_normals", no_draws)
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 8)
    for _ in range(2):
        assert math.isfinite(trainer.step(x, y))
    assert trainer.noise.size == sum(w.shape.num_elements() for w in trainer.model.trainable_weights)
    assert not np.any(trainer.noise.pool.numpy())
