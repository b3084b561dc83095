"""End to end under Flower's SecAgg+: what the server sees, dropouts, and user-level DP noise modes."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.common.secure_aggregation.quantization import quantize
from scipy import stats

from fedpriv.common.ledger import verify_ledger
from tests.conftest import run_harness, run_model, simulate_run

SMALL = ["run.rounds=1", "federation.num_clients=5", "federation.min_available_clients=5",
         "client.batch_size=64"]


def _uniformity_p(values: np.ndarray) -> float:
    """Chi-square p-value of the top byte of 32-bit values against uniform."""
    top = (values.astype(np.uint64) >> np.uint64(24)).astype(np.int64)
    return float(stats.chisquare(np.bincount(top, minlength=256)).pvalue)


@pytest.mark.slow
def test_server_sees_only_masked_vectors_whose_sum_is_the_clipped_sum(tmp_path):
    proc = run_harness("secagg_harness", str(tmp_path), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    view = np.load(tmp_path / "server-view.npz")
    clients = range(5)
    updates = {c: np.load(tmp_path / "updates" / f"update-{c}.npz") for c in clients}
    assert sorted(f for f in view.files if f.startswith("masked_")) == [f"masked_{c}" for c in clients]
    d = updates[0]["update"].size
    for c in clients:
        masked = view[f"masked_{c}"][1:]  # the first entry is the masked weight factor
        true = updates[c]["update"]
        assert masked.shape == true.shape and masked.min() >= 0 and masked.max() < 2**32
        # Each masked vector is statistically unrelated to the client's true update...
        assert abs(np.corrcoef(masked.astype(np.float64), true)[0, 1]) < 5 / math.sqrt(d)
        assert _uniformity_p(masked) > 1e-4
        # ...while the same statistics see the update through plain quantization at once.
        plain = quantize([true], 8.0, 2**22)[0]
        assert np.corrcoef(plain.astype(np.float64), true)[0, 1] > 0.99
        assert _uniformity_p(plain) < 1e-4
    others = view["masked_1"][1:].astype(np.float64)
    assert abs(np.corrcoef(view["masked_0"][1:].astype(np.float64), others)[0, 1]) < 5 / math.sqrt(d)
    # The unmasked sum equals the plain (weighted) sum of the updates up to quantization error.
    # The weight travels inside the masked vector; the plain count in the reply is cleared.
    assert all(float(view[f"weight_{c}"]) == 0 for c in clients)
    weights = np.array([float(updates[c]["weight"]) for c in clients])
    expected = sum(w * updates[c]["update"] for c, w in zip(clients, weights)) / weights.sum()
    final = np.concatenate([a.ravel() for a in run_model(tmp_path / "run")]).astype(np.float64)
    step = 2 * 8.0 / 2**22
    error = np.abs((final - view["global"].astype(np.float64)) - expected)
    assert error.max() <= step + 1e-6
    assert np.abs(expected).max() > 1000 * step  # the updates are far larger than the tolerance


def _simulate(out, *settings, preset="quickstart"):
    return simulate_run(out, list(settings), preset, here=True)


DROPOUT = [*SMALL, "secure_aggregation.num_shares=5", "secure_aggregation.reconstruction_threshold=3",
           "simulation.fail_stage=collect_masked_vectors"]


@pytest.mark.slow
def test_dropouts_within_tolerance_still_aggregate(cli_here, tmp_path):
    out = tmp_path / "run"
    proc, summary = _simulate(out, *DROPOUT, "dp.enabled=false", "simulation.fail_clients=1,3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (entry,) = summary["rounds"]
    assert entry["clients_trained"] == 3 and entry["clients_failed"] == 2 and entry["failed"] is None
    assert summary["privacy"]["failed_rounds"] == []
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert all("injected failure" in f["reason"] and "\n" not in f["reason"] for f in summary["failures"])
    assert summary["secure_aggregation"]["tolerated_dropouts"] == 2


@pytest.mark.slow
def test_dropouts_beyond_tolerance_fail_the_round_cleanly(cli_here, tmp_path):
    out = tmp_path / "run"
    proc, summary = _simulate(out, *DROPOUT, "run.rounds=2", "simulation.fail_clients=0,1,3",
                              "simulation.fail_rounds=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1 failed" in proc.stdout
    first, second = summary["rounds"]
    assert first["failed"].startswith("secure aggregation halted: 3 of 5 sampled clients dropped out")
    assert first["accuracy"] == pytest.approx(summary["initial_accuracy"])  # the model was kept
    assert second["failed"] is None and second["clients_trained"] == 5
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert [f["round"] for f in summary["privacy"]["failed_rounds"]] == [1]
    # The two clients that trained in the failed round spent budget, and the ledger says so.
    report = verify_ledger(out)
    assert report.ok, report.failures
    entries = report.entries
    spent_round_1 = {e["actor"] for e in entries if e["kind"] == "record_level" and e["round"] == 1}
    assert len(spent_round_1) == 2
    assert [e["round"] for e in entries if e["kind"] == "round_failed"] == [1]
    assert (out / "model.sealed").exists()
    audit = cli_here("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:]


@pytest.mark.slow
def test_a_failed_round_can_stop_the_run(cli_here, tmp_path):
    out = tmp_path / "run"
    proc, summary = _simulate(out, *DROPOUT, "dp.enabled=false", "run.rounds=3",
                              "simulation.fail_clients=0,1,3", "simulation.fail_rounds=2",
                              "federation.on_round_failure=stop")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the run stopped after round 2 failed")
    assert "Traceback" not in proc.stderr
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["privacy"]["stopped_early"]["round"] == 2
    assert (out / "model.sealed").exists() and verify_ledger(out).ok


@pytest.mark.slow
def test_cross_device_distributed_noise_is_recorded_and_accounted(cli_here, tmp_path):
    out = tmp_path / "run"
    proc, summary = _simulate(out, "run.rounds=2", "federation.num_clients=100",
                              "federation.min_available_clients=100", "federation.fraction_train=0.2",
                              "user_dp.noise_mode=distributed", "user_dp.noise_multiplier=1.0",
                              "client.local_epochs=1", preset="cross-device")
    assert proc.returncode == 0, proc.stderr[-2000:]
    user = summary["privacy"]["user_level"]
    assert user["enabled"] and user["noise_mode"] == "distributed" and user["epsilon"] > 0
    entries = [e for e in verify_ledger(out).entries if e["kind"] == "user_level"]
    assert len(entries) == 2
    exact, approx, overflow = rdp.RdpAccountant(), rdp.RdpAccountant(), 0.0
    for e in entries:
        p = e["parameters"]
        assert p["noise_mode"] == "distributed" and p["tau"] < 1e-100
        assert p["gaussian_approximation_noise_multiplier"] == pytest.approx(
            p["local_std"] * math.sqrt(p["clients_contributing"]) / p["sensitivity"])
        assert p["gaussian_approximation_noise_multiplier"] >= 1.0  # the configured z, at the worst tolerated dropout
        assert p["configured_noise_multiplier"] == 1.0
        assert p["sampling_probability"] == pytest.approx(0.2)
        assert "zCDP" in e["note"] and e["sampling"] == "none"
        # rho-zCDP composes as a Gaussian of noise multiplier 1/sqrt(2 rho), without amplification
        # (tests/test_distributed_dp_bound.py recomputes rho from the paper's formula).
        assert p["noise_multiplier"] == pytest.approx(1 / math.sqrt(2 * p["zcdp_rho"]))
        exact.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * p["zcdp_rho"])))
        overflow += p["delta_addition"]
        approx.compose(dp_accounting.PoissonSampledDpEvent(
            0.2, dp_accounting.GaussianDpEvent(p["gaussian_approximation_noise_multiplier"])))
    assert 0 < overflow < 1e-10
    assert user["epsilon"] == pytest.approx(exact.get_epsilon(1e-5 - overflow), rel=1e-6)
    assert user["epsilon_pld"] is None  # a zCDP bound has no privacy loss distribution
    assert user["epsilon_gaussian_approximation"] == pytest.approx(approx.get_epsilon(1e-5), rel=1e-6)
    assert user["epsilon_gaussian_approximation"] < user["epsilon"]
    audit = cli_here("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:]


def test_invalid_secure_aggregation_settings_fail_before_any_round(cli_here, tmp_path):
    cases = {
        "reconstruction_threshold (9) must be below": ["--set", "secure_aggregation.reconstruction_threshold=9"],
        "too small for distributed noise": ["--preset", "cross-device", "--set", "user_dp.noise_mode=distributed",
                                            "--set", "secure_aggregation.quantization_range=4096"],
        "must be a power of 2": ["--set", "secure_aggregation.quantization_range=5000"],
    }
    for message, args in cases.items():
        out = tmp_path / message.split()[0]
        proc = cli_here("simulate", *args, "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
        assert not out.exists()
