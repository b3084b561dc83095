"""Client faults in simulation: a client that crashes, hangs past the round timeout, or returns a
malformed update is dropped from the round with its reason recorded; the round completes when
enough clients remain and fails cleanly when not (issue: reliability under faults)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.common.ledger import verify_ledger
from fedpriv.common.updates import update_problem
from fedpriv.simulations.faults import corrupt
from tests.conftest import simulate_run

SHAPES = [(3, 4), (4,)]


def _update(scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) * scale for s in SHAPES]


# ---- the check itself, on every malformation the faults produce -------------------------------
@pytest.mark.parametrize("mode, expected", [
    ("wrong_count", "1 arrays, the model has 2"),
    ("wrong_shape", "array 0 has shape (13,), the model's is (3, 4)"),
    ("wrong_dtype", "array 0 has dtype int32, not float32 or float64"),
    ("nan", "non-finite values"),
    ("inf", "non-finite values"),
    ("over_clip", "above the clip bound 0.5"),
])
def test_each_malformation_is_named(mode, expected):
    assert update_problem(_update(), SHAPES, clip=0.5) is None
    problem = update_problem(corrupt(_update(), mode, clip=0.5), SHAPES, clip=0.5)
    assert problem is not None and expected in problem


def test_the_clip_check_allows_float32_rounding_only():
    clipped = [a / np.sqrt(sum(np.sum(np.square(b, dtype=np.float64)) for b in _update())) for a in _update()]
    assert update_problem(clipped, SHAPES, clip=1.0) is None  # norm 1 up to float32 rounding
    assert update_problem([a * 1.001 for a in clipped], SHAPES, clip=1.0) is not None
    assert update_problem([a * 1.001 for a in clipped], SHAPES, clip=None) is None  # no user-level DP


# ---- in simulation ----------------------------------------------------------------------------
# The small MLP on scikit-learn's digits: what is tested is how the server treats faulty clients,
# not the model, so each client's training stays short (2 hidden layers: 6 arrays).
MODEL = ["data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp"]
BASE = [*MODEL, "run.rounds=1", "client.batch_size=64", "simulation.fail_stage=train",
        "secure_aggregation.enabled=false",
        "federation.min_train_clients=2", "user_dp.enabled=true", "user_dp.clipping_norm=0.5"]
MODES = ["crash", "hang", "wrong_count", "wrong_shape", "wrong_dtype", "nan", "inf", "over_clip", "bad_record"]
REASONS = {
    "crash": "injected failure: client 1 at train in round 1",
    "hang": "no reply (dropped out or timed out)",
    "wrong_count": "update rejected (5 arrays, the model has 6)",
    "wrong_shape": "update rejected (array 0 has shape",
    "wrong_dtype": "update rejected (array 0 has dtype int32",
    "nan": "update rejected (non-finite values",
    "inf": "update rejected (non-finite values",
    "over_clip": "above the clip bound 0.5)",
    "bad_record": "malformed privacy record",
}


@pytest.mark.slow
def test_every_client_fault_is_dropped_and_the_round_completes(tmp_path):
    """Eleven clients: nine fail, one way each; the two honest ones carry the round."""
    out = tmp_path / "run"
    n = len(MODES) + 2
    proc, summary = simulate_run(out, [
        *BASE, f"federation.num_clients={n}", f"federation.min_available_clients={n}",
        "federation.round_timeout=20",  # the hanging client holds the run this long and 3 s more
        "simulation.fail_clients=" + ",".join(str(i + 1) for i in range(len(MODES))),
        "simulation.fail_mode=" + ",".join(MODES),
    ], here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (entry,) = summary["rounds"]
    assert entry["failed"] is None and entry["clients_trained"] == 2 and entry["clients_failed"] == len(MODES)
    reasons = [f["reason"] for f in summary["failures"]]
    assert len(reasons) == len(MODES), reasons
    for mode in MODES:
        matching = [r for r in reasons if REASONS[mode] in r]
        assert matching, f"{mode}: no failure says {REASONS[mode]!r} in {reasons}"
    assert sum("non-finite" in r for r in reasons) == 2  # nan and inf
    # Logged as well as recorded.
    assert sum("fedpriv: round 1: node" in line for line in (proc.stdout + proc.stderr).splitlines()) >= len(MODES)
    # The model moved (two updates aggregated) and stayed finite. (Its loss on the test data, not
    # its accuracy: one noised round can leave every prediction where it was.)
    assert np.isfinite(summary["final_accuracy"]) and np.isfinite(entry["loss"])
    assert entry["loss"] != summary["initial_loss"]
    # Clients that trained spent, whether or not their update was usable; the ledger holds those
    # the server could read (bad_record's is unreadable; crash and hang never trained).
    entries = verify_ledger(out).entries
    spent = {e["actor"] for e in entries if e["kind"] == "record_level"}
    trained = {0, n - 1} | {i + 1 for i, m in enumerate(MODES) if m not in ("crash", "hang", "bad_record")}
    assert spent == {f"client:{i}" for i in trained}
    user = [e for e in entries if e["kind"] == "user_level"]
    assert len(user) == 1 and user[0]["parameters"]["clients_contributing"] == 2


@pytest.mark.slow
def test_a_round_with_too_few_usable_updates_fails_cleanly(tmp_path):
    out = tmp_path / "run"
    proc, summary = simulate_run(out, [
        *BASE, "federation.num_clients=4", "federation.min_available_clients=4", "run.rounds=2",
        "simulation.fail_clients=0,1,2", "simulation.fail_mode=nan,over_clip,wrong_shape", "simulation.fail_rounds=1",
    ], here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = summary["rounds"]
    assert first["failed"] == "only 1 usable update(s), fewer than federation.min_train_clients (2)"
    # the model was not touched
    assert (first["accuracy"], first["loss"]) == (summary["initial_accuracy"], summary["initial_loss"])
    assert second["failed"] is None and second["clients_trained"] == 4  # the run went on
    entries = verify_ledger(out).entries
    assert [e["round"] for e in entries if e["kind"] == "round_failed"] == [1]
    assert [e["round"] for e in entries if e["kind"] == "user_level"] == [2]  # nothing released in round 1


@pytest.mark.slow
def test_under_secagg_a_malformed_update_is_refused_by_its_client_and_counts_as_a_dropout(tmp_path):
    out = tmp_path / "run"
    proc, summary = simulate_run(out, [
        *MODEL, "run.rounds=1", "client.batch_size=64", "federation.num_clients=5",
        "federation.min_available_clients=5",
        "secure_aggregation.enabled=true", "secure_aggregation.num_shares=5",
        "secure_aggregation.reconstruction_threshold=3", "user_dp.enabled=true", "user_dp.clipping_norm=0.5",
        "simulation.fail_clients=1,3", "simulation.fail_mode=nan,over_clip",
    ], here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = summary["rounds"]
    assert entry["failed"] is None and entry["clients_trained"] == 3 and entry["clients_failed"] == 2
    reasons = " | ".join(f["reason"] for f in summary["failures"])
    assert "refusing to mask a malformed update (non-finite values" in reasons
    assert "refusing to mask a malformed update (L2 norm" in reasons
    assert np.isfinite(summary["final_accuracy"])
