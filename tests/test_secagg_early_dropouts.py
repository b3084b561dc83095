"""SecAgg+ rounds in which a node drops before its key shares reach its neighbours.

A node that fails at setup or at key sharing has added no mask to anyone's vector and left no
share of its secrets with anyone. Flower 1.42's ``SecAggPlusWorkflow`` still counts it among the
round's dropped nodes at unmasking: it asks its neighbours for shares they never received, and
needs a threshold of them itself, so the whole round fails. fedpriv's workflow counts as dropped
only nodes whose shares were handed on (:class:`server.secagg_workflow.FedprivSecAggPlusWorkflow`);
these tests run both, in one process, on Flower's own protocol code (tests/secagg_protocol.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedpriv.clients.mods import make_secure_aggregation_mod
from fedpriv.server.secagg_workflow import FedprivSecAggPlusWorkflow, federation_roster
from tests.secagg_protocol import make_nodes, run_round, stock_mod
from tests.test_secagg_attacks import CLIP, TARGET, _config, _updates, _workflow

DROPPED = 1002


def _failing_at(stage: str, node_id: int = DROPPED):
    """Wraps a node's handler so that it fails (Flower's error reply) at ``stage``."""

    def wrap(handler):
        def failing(msg: Message, context):
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and configs.get(Key.STAGE) == stage:
                return Message(Error(code=0, reason=f"node {node_id} lost at {stage}"), reply_to=msg)
            return handler(msg, context)
        return failing

    return wrap


def _drop(nodes, stage):
    node = nodes[DROPPED]
    node.handler = _failing_at(stage)(node.handler)


def _mean_of_others(nodes):
    return [np.mean([n.update[i] for n in nodes.values() if n.node_id != DROPPED], axis=0) for i in range(2)]


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_stock_flower_fails_the_round_when_a_node_drops_before_sharing_its_keys(stage):
    updates = _updates(5)
    nodes = make_nodes(updates, stock_mod)
    _drop(nodes, stage)
    model = [np.zeros_like(a) for a in updates[0]]
    strategy, grid = run_round(_workflow(SecAggPlusWorkflow, 5, 3), nodes, model)
    assert strategy.aggregate is None  # upstream behaviour: when this fails, drop the override
    survivors = set(nodes) - {DROPPED}
    assert survivors <= set(grid.refusals)  # asked for shares of a node they never heard from


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS])
def test_fedpriv_unmasks_the_survivors_mean_when_a_node_drops_at_any_stage_before_unmasking(tmp_path, stage):
    cfg = _config(tmp_path, 5, 5, 3)
    updates = _updates(5)
    nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
    _drop(nodes, stage)
    workflow = _workflow(FedprivSecAggPlusWorkflow, 5, 3, roster=federation_roster(cfg))
    model = [np.zeros_like(a) for a in updates[0]]
    strategy, grid = run_round(workflow, nodes, model)
    assert set(grid.refusals) == {DROPPED}  # no survivor refused anything
    assert strategy.aggregate is not None
    step = 2 * CLIP / TARGET
    for got, want in zip(strategy.aggregate, _mean_of_others(nodes), strict=True):
        assert np.abs(got - want).max() <= 4 * step


def test_fedpriv_unmasks_with_one_node_lost_at_setup_and_another_after_sharing(tmp_path):
    """A node gone before sharing and one gone after: the second one's pairwise masks are removed
    with its rebuilt key, and the first one is never asked about."""
    cfg = _config(tmp_path, 6, 5, 3)
    updates = _updates(6)
    nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
    _drop(nodes, Stage.SETUP)
    late = 1004
    nodes[late].handler = _failing_at(Stage.COLLECT_MASKED_VECTORS, late)(nodes[late].handler)
    workflow = _workflow(FedprivSecAggPlusWorkflow, 5, 3, roster=federation_roster(cfg))
    model = [np.zeros_like(a) for a in updates[0]]
    strategy, grid = run_round(workflow, nodes, model)
    assert set(grid.refusals) == {DROPPED, late}
    assert strategy.aggregate is not None
    want = [np.mean([n.update[i] for n in nodes.values() if n.node_id not in (DROPPED, late)], axis=0)
            for i in range(2)]
    step = 2 * CLIP / TARGET
    for got, expected in zip(strategy.aggregate, want, strict=True):
        assert np.abs(got - expected).max() <= 4 * step
