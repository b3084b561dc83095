"""Access control on the node and in the server's accounting.

A node holds every run to its own privacy floor (clients.policy), whatever the run's
configuration says: runs with DP off, SecAgg+ off, too few shares, noise below its minimum or a
budget above its own are refused before training, with the reason in the node's ledger and, once
the refusal reaches the server, in the run's. The server charges spending to the node Flower
authenticated, never to an id a client declares.
"""

from __future__ import annotations

import json

import dp_accounting
import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters

from fedpriv.clients.app import TRAINING_LOG, make_client_app
from fedpriv.clients.policy import NodePolicy, load_policy
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.common.errors import ConfigError
from fedpriv.common.ledger import verify_ledger
from fedpriv.common.models import build_model, resolve_model_name
from fedpriv.common.protocol import BUDGET_EXHAUSTED_CODE, POLICY_REFUSED_CODE, RUN_ID, SECAGG_REFUSED_CODE, SERVER_ROUND
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.common.presets import preset_layers
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy, clean_reason
from tests.conftest import task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


# A run the default node policy accepts: DP-SGD (noise 1.1), SecAgg+ (auto: 5 shares), a budget.
ACCEPTED = ["data.dataset=digits", "model.name=mlp", "model.mlp_units=16", "client.batch_size=16",
            "dp.noise_multiplier=1.1", "privacy.record_budget=8"]


def _node(tmp_path, cfg, name="alice", policy: str | None = None, node_id=7):
    dataset = load_dataset(cfg.data, cfg.run.seed)
    data = tmp_path / f"{name}.npz"
    np.savez(data, x=dataset.x_train[:64], y=dataset.y_train[:64])
    config = {"data-path": str(data), "node-name": name, "state-dir": str(tmp_path / "state")}
    if policy is not None:
        path = tmp_path / f"{name}-policy.toml"
        path.write_text(policy)
        config["policy-path"] = str(path)
    return Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config=cfg.to_flat())


def _train_message(cfg, server_round, run_id="run-a", node_id=7):
    dataset = load_dataset(cfg.data, cfg.run.seed)
    model = build_model(resolve_model_name(cfg.model, dataset.input_shape), cfg.model, dataset.input_shape,
                        dataset.num_classes)
    weights = [np.asarray(w) for w in model.get_weights()]
    fitins = FitIns(ndarrays_to_parameters(weights), {SERVER_ROUND: server_round, RUN_ID: run_id})
    return Message(content=compat.fitins_to_recorddict(fitins, True), dst_node_id=node_id, message_type="train",
                   group_id=str(server_round))


def _node_entries(tmp_path, name="alice"):
    return verify_ledger(tmp_path / "state" / name).entries


@pytest.mark.parametrize("weaker, policy, expected", [
    (["dp.enabled=false", "privacy.record_budget=0"], None, "record-level DP is off"),
    (["secure_aggregation.enabled=false"], None, "SecAgg+ is off"),
    (["secure_aggregation.num_shares=3", "secure_aggregation.reconstruction_threshold=2"],
     "[secure_aggregation]\nmin_shares = 5\n", "SecAgg+ uses 3 shares, fewer than this node's minimum of 5"),
    (["dp.noise_multiplier=0.3"], None, "noise multiplier is 0.3, below this node's minimum of 0.5"),
    (["privacy.record_budget=50"], "[record_level]\nbudget_total = 4.0\n",
     "record-level budget is 50, above this node's budget of 4"),
    (["privacy.record_budget=0"], None, "record-level budget is unlimited (0)"),
])
def test_a_run_weaker_than_the_nodes_policy_is_refused_before_training(tmp_path, weaker, policy, expected):
    cfg = load_config(overrides=[*ACCEPTED, *weaker])
    context = _node(tmp_path, cfg, policy=policy)
    reply = make_client_app(cfg)(_train_message(cfg, 1), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED_CODE
    assert expected in reply.error.reason
    # Before training: no spend, no training log; the refusal is in the node's signed ledger.
    entries = _node_entries(tmp_path)
    assert [e["kind"] for e in entries] == ["policy_refusal"]
    assert expected in entries[0]["note"] and entries[0]["round"] == 1
    assert not (tmp_path / "state" / "alice" / TRAINING_LOG).exists()
    # The server records the refusal in the run's ledger when the reply reaches it.
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, [np.zeros(3, np.float32)], RunLog(), recorder, lambda r, w: (0.0, 0.0),
                               authenticated_nodes=True)
    strategy.observe_reply(reply)
    (refusal,) = [e for e in verify_ledger(tmp_path / "run").entries if e["kind"] == "refusal"]
    assert refusal["actor"] == "node:7" and expected in refusal["note"]


def test_a_run_the_policy_accepts_trains(tmp_path):
    cfg = load_config(overrides=[*ACCEPTED, "secure_aggregation.enabled=false"])
    context = _node(tmp_path, cfg, policy="[secure_aggregation]\nrequired = false\n")
    reply = make_client_app(cfg)(_train_message(cfg, 1), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert [e["kind"] for e in _node_entries(tmp_path)] == ["record_level"]


def test_a_plain_training_request_in_a_secagg_run_is_refused(tmp_path):
    """A server that skips SecAgg+ and asks for the update in clear gets a refusal, not the update."""
    cfg = load_config(overrides=ACCEPTED)
    assert cfg.secure_aggregation.enabled
    reply = make_client_app(cfg)(_train_message(cfg, 1), _node(tmp_path, cfg))
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED_CODE
    assert "plain training reply" in reply.error.reason
    assert [e["kind"] for e in _node_entries(tmp_path)] == ["secagg_refusal"]
    assert not (tmp_path / "state" / "alice" / TRAINING_LOG).exists()


def _epsilon(rounds, q, steps, z, delta=1e-5):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds * steps)
    return acc.get_epsilon(delta)


def test_the_nodes_per_run_budget_holds_within_a_run_and_its_total_across_runs(tmp_path):
    cfg = load_config(overrides=[*ACCEPTED, "secure_aggregation.enabled=false"])
    # The public schedule: ceil(1437 digits / 10 clients) = 144 records at batch 16: 9 steps at 1/9.
    one, two = _epsilon(1, 16 / 144, 9, 1.1), _epsilon(2, 16 / 144, 9, 1.1)
    per_run = (one + two) / 2  # room for one round per run
    total = (_epsilon(2, 16 / 144, 9, 1.1) + _epsilon(3, 16 / 144, 9, 1.1)) / 2  # two rounds in all
    policy = (f"[secure_aggregation]\nrequired = false\n[record_level]\nbudget_per_run = {per_run}\n"
              f"budget_total = {total}\n")
    cfg = load_config(overrides=[*ACCEPTED, "secure_aggregation.enabled=false", f"privacy.record_budget={total}"])
    context = _node(tmp_path, cfg, policy=policy)
    app = make_client_app(cfg)
    assert not app(_train_message(cfg, 1, "run-a"), context).has_error()
    second = app(_train_message(cfg, 2, "run-a"), context)
    assert second.has_error() and second.error.code == BUDGET_EXHAUSTED_CODE
    assert "per-run budget" in second.error.reason
    assert not app(_train_message(cfg, 1, "run-b"), context).has_error()  # a new run, within the total
    third = app(_train_message(cfg, 1, "run-c"), context)
    assert third.has_error() and third.error.code == BUDGET_EXHAUSTED_CODE
    assert "node's budget" in third.error.reason
    assert [e["kind"] for e in _node_entries(tmp_path)] == ["record_level", "record_level"]


@pytest.mark.parametrize("text, message", [
    ("[record_level]\nmin_noise = 1.0\n", "unknown key record_level.min_noise"),
    ("[recordlevel]\n", "unknown section [recordlevel]"),
    ("[record_level]\nrequired = 1\n", "record_level.required must be true or false"),
    ("[record_level]\nmin_noise_multiplier = -1\n", "must be a finite number >= 0"),
    ("[secure_aggregation]\nmin_shares = 2\n", "cannot be below fedpriv's floor of 3"),
    ("[model]\nallowed = ['resnet']\n", "must be a non-empty list of cnn, mlp"),
    ("[record_level\n", "is not valid TOML"),
])
def test_a_bad_policy_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_policy(path)
    assert "\n" not in str(err.value)


def test_the_default_policy_accepts_the_federation_preset():
    # The preset of fedpriv's own federation (README, compose): three nodes, 3 shares, budget 8.
    assert NodePolicy().problems(load_config(preset_layers("federation"))) == []
    assert load_policy(None) == NodePolicy()


# ---- accounting by authenticated node ---------------------------------------------------------
def _reply(node, client_id, round_spend, prior=()):
    metrics = {"client-id": client_id, "privacy.round-spend": json.dumps(round_spend),
               "privacy.prior-spends": json.dumps(list(prior))}
    content = compat.fitres_to_recorddict(  # a training reply, as Flower's legacy ClientApp writes it
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 1, metrics), keep_input=False)
    from types import SimpleNamespace
    return SimpleNamespace(metadata=SimpleNamespace(group_id="1", src_node_id=node), has_error=lambda: False,
                           content=content)


SPEND = {"sampling_probability": 0.05, "noise_multiplier": 1.1, "steps": 20}
BIG_PRIOR = {"sampling_probability": 0.5, "noise_multiplier": 0.6, "steps": 400}
OWN_PRIOR = {"sampling_probability": 0.05, "noise_multiplier": 1.1, "steps": 60}


def test_a_client_declaring_another_nodes_id_changes_nothing_in_its_accounting(tmp_path):
    cfg = load_config(overrides=["dp.noise_multiplier=1.1"])
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, [np.zeros(3, np.float32)], RunLog(), recorder, lambda r, w: (0.0, 0.0),
                               authenticated_nodes=True)
    # Node 1001 replies first, claiming to be node 1002, with a prior spend that would pre-empt
    # 1002's own record of what it spent before the run.
    strategy.observe_reply(_reply(1001, 1002, SPEND, prior=[BIG_PRIOR]))
    strategy.observe_reply(_reply(1002, 1002, SPEND, prior=[OWN_PRIOR]))
    entries = [e for e in verify_ledger(tmp_path / "run").entries if e["actor"].startswith("client:")]
    victim = [e for e in entries if e["actor"] == "client:1002"]
    assert [e["kind"] for e in victim] == ["record_level_carried", "record_level"]
    assert victim[0]["parameters"]["spends"] == [OWN_PRIOR]
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 80)
    assert victim[1]["epsilon"]["rdp"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # The spoofer's spending is charged to the spoofer.
    assert {e["actor"] for e in entries} == {"client:1001", "client:1002"}


def test_in_a_simulation_a_declared_id_stays_with_the_first_node_that_used_it(tmp_path):
    cfg = load_config(overrides=["dp.noise_multiplier=1.1"])
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    strategy = FedprivStrategy(cfg, [np.zeros(3, np.float32)], RunLog(), recorder, lambda r, w: (0.0, 0.0))
    strategy.observe_reply(_reply(501, 3, SPEND))
    strategy.observe_reply(_reply(502, 3, SPEND, prior=[BIG_PRIOR]))
    assert "already held by another node" in strategy.rounds[1].malformed[502]
    assert [e["actor"] for e in verify_ledger(tmp_path / "run").entries if e["actor"].startswith("client:")] == \
        ["client:3"]


def test_refusal_reasons_are_bounded_printable_lines():
    assert clean_reason("budget \x1b[31mred\x1b[0m\x07\x00 end") == "budget red?? end"
    long = clean_reason("budget exhausted " + "x" * 100_000)
    assert len(long) == 300 and long.isprintable() and long.endswith("...")
    assert clean_reason("first\nlast line\r") == "last line"
    assert clean_reason("") == "unknown error"
