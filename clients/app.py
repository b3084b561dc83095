"""The fedpriv ClientApp: local DP-SGD training and record-level accounting on each node.

The client keeps its own record-level spending in its node state (``context.state``) as the
parameters of dp-accounting events, and reports the cumulative epsilon over every round it
trained in.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import get_trainer
from common.accounting import DPSGDSpend, merge_spends, record_level_epsilon
from common.config import DataSection, RunConfig, config_from_run_config
from common.data import load_dataset
from common.errors import DataError
from common.models import resolve_model_name
from common.partition import partition
from common.protocol import (
    ARRAYS, CLIENT_ID, METRICS, NUM_EXAMPLES, RECORD_EPSILON, STEPS, TRAIN_LOSS,
)

STATE_KEY = "fedpriv-record-level"
SPENDS = "spends-json"


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


def load_spends(context: Context) -> list[DPSGDSpend]:
    if STATE_KEY not in context.state.config_records:
        return []
    raw = context.state.config_records[STATE_KEY][SPENDS]
    return [DPSGDSpend.from_json(item) for item in json.loads(str(raw))]


def save_spends(context: Context, spends: list[DPSGDSpend]) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord(
        {SPENDS: json.dumps([s.to_json() for s in spends])}
    )


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
        result = trainer.train(msg.content[ARRAYS].to_numpy_ndarrays(), x, y)
        metrics = {
            NUM_EXAMPLES: result.num_examples,
            TRAIN_LOSS: result.mean_loss,
            STEPS: result.steps,
            CLIENT_ID: partition_id,
        }
        if result.spend is not None:
            spends = load_spends(context) + [result.spend]
            save_spends(context, merge_spends(spends))
            metrics[RECORD_EPSILON] = record_level_epsilon(spends, cfg.privacy.delta)
        content = RecordDict(
            {ARRAYS: ArrayRecord(result.weights), METRICS: MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
