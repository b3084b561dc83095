"""Budgets in real simulations: clients refuse, the server stops, spending survives restarts.

The simulations run in fresh interpreters; the audits of their run directories run in this process
(``run_cli_here``), as they start no federation."""

import json
import math

import pytest

from fedpriv.common.ledger import verify_ledger
from tests.conftest import poisson_gaussian_epsilon, run_cli_here, simulate_run

pytestmark = pytest.mark.slow

BASE = [
    "data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", "federation.num_clients=3", "federation.min_available_clients=3",
    "federation.min_train_clients=1", "client.local_epochs=1", "client.batch_size=64",
    "dp.noise_multiplier=1.1", "privacy.delta=1e-5",
]
DIGITS_TRAIN = 1797 - round(1797 * 0.2)


def _epsilon_after(rounds, n):
    return poisson_gaussian_epsilon(64 / n, 1.1, rounds * math.ceil(n / 64), 1e-5)


def _simulate(cli, out, *settings):
    # In this process: each run starts its own Ray and virtual clients (fresh processes that
    # read their state from client.state_dir), so a second run still restarts every node.
    return simulate_run(out, [*BASE, *settings], here=True)


def test_clients_refuse_past_their_budget_and_spending_survives_a_restart(cli, tmp_path):
    n = math.ceil(DIGITS_TRAIN / 3)  # the public schedule size every client trains for
    budget = (_epsilon_after(2, n) + _epsilon_after(3, n)) / 2  # room for exactly 2 rounds
    state = tmp_path / "nodes"
    proc, summary = _simulate(cli, tmp_path / "run1", "run.rounds=4", f"privacy.record_budget={budget}",
                              f"client.state_dir={state}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = [r["clients_trained"] for r in summary["rounds"]]
    assert trained == [3, 3, 0, 0]
    refusals = summary["privacy"]["refusals"]
    assert sorted(r["round"] for r in refusals) == [3, 3, 3, 4, 4, 4]
    assert all("budget exhausted" in r["reason"] for r in refusals)
    assert max(summary["privacy"]["record_level"]["clients"].values()) <= budget
    assert run_cli_here("audit", str(tmp_path / "run1")).returncode == 0

    # Each node's own signed ledger holds its two rounds.
    for node in sorted(p for p in state.iterdir() if p.is_dir()):  # (beside the simulation's keys)
        report = verify_ledger(node)
        assert report.ok and [e["round"] for e in report.entries] == [1, 2]

    # "Restart" the nodes in a new run with a larger budget: they start from what they spent.
    budget2 = (_epsilon_after(3, n) + _epsilon_after(4, n)) / 2  # room for one more round only
    proc, summary2 = _simulate(cli, tmp_path / "run2", "run.rounds=3", f"privacy.record_budget={budget2}",
                               f"client.state_dir={state}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["clients_trained"] for r in summary2["rounds"]] == [3, 0, 0]
    for cid, eps in summary2["privacy"]["record_level"]["clients"].items():
        assert eps > _epsilon_after(2, n)  # not reset: it includes run 1's two rounds
        assert eps <= budget2
    audit = run_cli_here("audit", str(tmp_path / "run2"), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:]
    assert json.loads(audit.stdout)["epsilon"]["record_level"]["0"]["rdp"] == pytest.approx(
        summary2["privacy"]["record_level"]["clients"]["0"], rel=1e-6)


def test_server_stops_before_the_user_level_budget(cli, tmp_path, own_server_state):
    def user_eps(rounds):  # every client sampled (Poisson with q = 1), add/remove-one adjacency
        return poisson_gaussian_epsilon(1.0, 4.0, rounds, 1e-5)

    budget = (user_eps(2) + user_eps(3)) / 2
    out = tmp_path / "run"
    proc, summary = _simulate(cli, out, "run.rounds=6", "dp.enabled=false", "user_dp.enabled=true",
                              "user_dp.noise_multiplier=4.0", f"privacy.user_budget={budget}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 3 clients at z = 4: the command says before training that no update can stand out.
    ratio = 4.0 * math.sqrt(summary["model_parameters"]) / (3 * math.sqrt(6))
    printed = " ".join(proc.stdout.split())  # (the console wraps long lines)
    warned = printed.index(f"warning: user-level noise leaves no signal: over the run's 6 rounds the noise "
                           f"on the averaged updates is {ratio:.1f}x")
    assert warned < printed.index("round 1/")
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["privacy"]["stopped_early"]["round"] == 3
    assert summary["privacy"]["user_level"]["epsilon"] == pytest.approx(user_eps(2), rel=1e-6)
    assert summary["privacy"]["user_level"]["epsilon"] <= budget
    assert summary["final_accuracy"] is not None and (out / "model.sealed").exists()
    audit = run_cli_here("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:]
    report = json.loads(audit.stdout)
    assert report["budget_ok"] and report["stopped_early"]["round"] == 3
