"""Strategy assembly: Flower's FedAvg or FedAdam, optionally inside Flower's user-level DP
wrapper, wrapped once more to record and enforce what each round does to privacy."""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, Strategy,
)

from common.config import RunConfig
from common.errors import FedprivError
from common.protocol import (
    BUDGET_EXHAUSTED_CODE, CLIENT_ID, METRICS, NUM_EXAMPLES, PRIVACY, RECORD_EPSILON,
    UNIFORM_WEIGHT,
)
from server.privacy import PrivacyRecorder
from server.run_log import RunLog


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured Flower strategy. Clients are not asked to evaluate: the server does.

    With user-level DP, clients are weighted uniformly (every client's clipped update counts
    the same), which keeps the sensitivity of the sum at the clipping norm.
    """
    federation = cfg.federation
    common = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": federation.min_train_clients,
        "min_available_nodes": federation.min_available_clients,
        "weighted_by_key": UNIFORM_WEIGHT if cfg.user_dp.enabled else NUM_EXAMPLES,
    }
    if federation.strategy == "fedadam":
        strategy: Strategy = FedAdam(eta=federation.server_learning_rate, **common)
    else:
        strategy = FedAvg(**common)
    if cfg.user_dp.enabled:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=cfg.user_dp.noise_multiplier,
            clipping_norm=cfg.user_dp.clipping_norm,
            num_sampled_clients=federation.min_train_clients,  # set per round below
        )
    return strategy


class NotEnoughClients(FedprivError):
    """Fewer clients connected than the run needs, within federation.connect_timeout."""


def wait_for_clients(grid: Grid, needed: int, timeout: float, poll: float = 0.5) -> int:
    """Wait until ``needed`` nodes are connected; return how many are. Flower's own sampling
    waits without limit, which would hang a misconfigured run forever."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise NotEnoughClients(
                f"only {connected} of the {needed} clients the run needs connected within "
                f"{timeout:g} s (federation.min_available_clients / min_train_clients; under "
                f"flwr run, set --federation-config \"num-supernodes=N\")"
            )
        time.sleep(poll)
    return connected


def sample_size(cfg: RunConfig, population: int) -> int:
    """How many nodes Flower's FedAvg samples from ``population`` (its own rule)."""
    return max(int(population * cfg.federation.fraction_train), cfg.federation.min_train_clients)


class RecordingStrategy(Strategy):
    """Wraps any strategy: records each round in the RunLog and the privacy ledger, and
    enforces the user-level budget before a round starts."""

    def __init__(self, strategy: Strategy, run_log: RunLog, recorder: PrivacyRecorder, cfg: RunConfig) -> None:
        self.strategy = strategy
        self.run_log = run_log
        self.recorder = recorder
        self.cfg = cfg
        self.latest_arrays: ArrayRecord | None = None
        self._plan: dict[int, tuple[int, int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.latest_arrays = arrays
        federation = self.cfg.federation
        population = wait_for_clients(
            grid, max(federation.min_available_clients, federation.min_train_clients),
            federation.connect_timeout)
        sampled = min(sample_size(self.cfg, population), max(population, 1))
        self._plan[server_round] = (population, sampled)
        self.recorder.check_user_budget(server_round, population, sampled)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, ok, errors = [], [], []
        for msg in replies:
            if msg.has_error():
                reason = f"node {msg.metadata.src_node_id}: {msg.error.reason}"
                errors.append(reason)
                if msg.error.code == BUDGET_EXHAUSTED_CODE:
                    self.recorder.record_refusal(server_round, str(msg.metadata.src_node_id), msg.error.reason)
                continue
            if METRICS not in msg.content.metric_records:
                errors.append(f"node {msg.metadata.src_node_id}: reply without metrics")
                continue
            metrics = dict(msg.content.metric_records[METRICS])
            privacy = dict(msg.content.config_records.get(PRIVACY, {}))
            try:
                client_id = str(int(metrics[CLIENT_ID]))
                declared = self.recorder.parse_declaration(privacy)
            except (KeyError, TypeError, ValueError) as exc:
                # A reply whose privacy record cannot be read is not aggregated: its spending
                # could not be accounted.
                errors.append(f"node {msg.metadata.src_node_id}: malformed privacy record ({exc})")
                continue
            epsilon = self.recorder.record_client(server_round, client_id, declared)
            if epsilon is not None:
                metrics[RECORD_EPSILON] = epsilon  # the server's own figure, from the events
            ok.append(metrics)
            valid.append(msg)
        self.run_log.record_train(server_round, ok, errors)
        if isinstance(self.strategy, DifferentialPrivacyServerSideFixedClipping) and valid:
            # Noise for the sum of the updates actually aggregated: std = z * C on that sum.
            self.strategy.num_sampled_clients = len(valid)
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        if arrays is not None:
            self.latest_arrays = arrays
            if self.cfg.user_dp.enabled:
                population, sampled = self._plan[server_round]
                epsilon = self.recorder.record_user_round(server_round, population, sampled, len(valid))
                self.run_log.entry(server_round).user_epsilon = epsilon
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
