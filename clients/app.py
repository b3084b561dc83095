"""The fedpriv ClientApp: local DP-SGD training and record-level accounting on each node.

The client keeps its own record-level spending in its node state (``context.state``) as the
parameters of dp-accounting events, and reports the cumulative epsilon over every round it
trained in.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.budget import BudgetExhausted, NodeBudgetGuard, open_guard
from clients.trainer import TrainResult, get_trainer
from common.accounting import merge_spends
from common.config import DataSection, RunConfig, config_from_run_config
from common.data import load_dataset
from common.errors import DataError
from common.models import resolve_model_name
from common.partition import partition
from common.protocol import (
    ARRAYS, BUDGET_EXHAUSTED_CODE, CLIENT_ID, CONFIG, METRICS, NUM_EXAMPLES, PRIOR_SPENDS, PRIVACY,
    RECORD_EPSILON, ROUND_SPEND, STEPS, TRAIN_LOSS, UNIFORM_WEIGHT,
)

NODES_DIR = "nodes"
RUN_MARKER = "fedpriv-run"


@functools.lru_cache(maxsize=4)
def _partitions(data: DataSection, seed: int, num_clients: int) -> list[np.ndarray]:
    dataset = load_dataset(data, seed)
    return partition(dataset.y_train, num_clients, data, seed)


def local_data(cfg: RunConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """This simulated client's share of the training data (an index view, built once)."""
    if not 0 <= partition_id < cfg.federation.num_clients:
        raise DataError(
            f"partition {partition_id} is outside 0..{cfg.federation.num_clients - 1}"
        )
    dataset = load_dataset(cfg.data, cfg.run.seed)
    indices = _partitions(cfg.data, cfg.run.seed, cfg.federation.num_clients)[partition_id]
    return dataset.x_train[indices], dataset.y_train[indices]


def node_state_dir(cfg: RunConfig, node_id: str) -> Path:
    """Where this node keeps its key and signed spending ledger (see the client.state_dir help)."""
    if cfg.client.state_dir:
        root = Path(cfg.client.state_dir)
    elif cfg.run.out_dir:
        root = Path(cfg.run.out_dir) / NODES_DIR
    else:
        root = Path(os.environ.get("FEDPRIV_HOME", Path.home() / ".fedpriv")) / NODES_DIR
    return root / node_id


def node_partition(context: Context, cfg: RunConfig) -> int:
    """The partition this virtual node trains on, checked against the configuration."""
    if "partition-id" not in context.node_config:
        raise DataError("this node has no partition-id in its node config; fedpriv's ClientApp "
                        "currently runs in simulation only")
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if partitions != cfg.federation.num_clients:
        raise DataError(
            f"the federation has {partitions} virtual nodes but federation.num_clients is "
            f"{cfg.federation.num_clients}; make them equal (flwr run: --federation-config "
            f"\"num-supernodes={cfg.federation.num_clients}\")"
        )
    return int(context.node_config["partition-id"])


def _metrics(result: TrainResult, partition_id: int) -> dict[str, float | int]:
    return {
        NUM_EXAMPLES: result.num_examples,
        UNIFORM_WEIGHT: 1,
        TRAIN_LOSS: result.mean_loss,
        STEPS: result.steps,
        CLIENT_ID: partition_id,
    }


def _declare_prior_spending(context: Context, guard: NodeBudgetGuard) -> dict[str, str]:
    """On this run's first round on this node, tell the server what was spent before it."""
    if context.state.config_records.get(RUN_MARKER):
        return {}
    context.state.config_records[RUN_MARKER] = ConfigRecord({"started": True})
    return {PRIOR_SPENDS: json.dumps([s.to_json() for s in merge_spends(guard.spends)])}


def _server_round(msg: Message) -> int | None:
    config = msg.content.config_records.get(CONFIG)
    return int(config["server-round"]) if config and "server-round" in config else None


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_from_run_config(context.run_config, config)
        partition_id = node_partition(context, cfg)
        x, y = local_data(cfg, partition_id)
        dataset = load_dataset(cfg.data, cfg.run.seed)
        model_name = resolve_model_name(cfg.model, dataset.input_shape)
        trainer = get_trainer(
            model_name, cfg.model, cfg.client, cfg.dp, dataset.input_shape, dataset.num_classes
        )
        planned = trainer.planned_spend(len(y))
        weights = msg.content[ARRAYS].to_numpy_ndarrays()
        if planned is None:  # no record-level DP: nothing to spend, nothing to guard
            result = trainer.train(weights, x, y)
            privacy: dict[str, str] = {}
            metrics = _metrics(result, partition_id)
        else:
            state_dir = node_state_dir(cfg, f"sim-{partition_id}")
            with open_guard(state_dir, cfg.privacy.record_budget, cfg.privacy.delta) as guard:
                try:
                    guard.check(planned)
                except BudgetExhausted as exc:
                    return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=str(exc)), reply_to=msg)
                privacy = _declare_prior_spending(context, guard)
                result = trainer.train(weights, x, y)
                metrics = _metrics(result, partition_id)
                metrics[RECORD_EPSILON] = guard.record(result.spend, _server_round(msg))
                privacy[ROUND_SPEND] = json.dumps(result.spend.to_json())
        content = RecordDict(
            {ARRAYS: ArrayRecord(result.weights), METRICS: MetricRecord(metrics),
             PRIVACY: ConfigRecord(privacy)}
        )
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
