"""Strategy assembly: Flower's FedAvg or FedAdam, wrapped to record what each round did."""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from common.config import FederationSection
from common.protocol import METRICS
from server.run_log import RunLog


def build_strategy(federation: FederationSection) -> Strategy:
    """The configured Flower strategy. Clients are not asked to evaluate: the server does."""
    common = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": federation.min_train_clients,
        "min_available_nodes": federation.min_available_clients,
    }
    if federation.strategy == "fedadam":
        return FedAdam(eta=federation.server_learning_rate, **common)
    return FedAvg(**common)


class RecordingStrategy(Strategy):
    """Wraps any strategy; hands each round's train replies to a :class:`RunLog` first."""

    def __init__(self, strategy: Strategy, run_log: RunLog) -> None:
        self.strategy = strategy
        self.run_log = run_log

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok, errors = [], []
        for msg in replies:
            if msg.has_error():
                errors.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
            elif METRICS in msg.content.metric_records:
                ok.append(dict(msg.content.metric_records[METRICS]))
        self.run_log.record_train(server_round, ok, errors)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
