"""The fedpriv ClientApp: local DP-SGD training, record-level accounting and the update it sends.

Each round the client trains from the global model, guards and records its record-level spending
in its own signed node ledger, and replies with its model *update* (trained minus global). With
user-level DP the update is clipped here, before any masking; in distributed-noise mode the
client also adds its share of the noise (see :mod:`common.secagg`). Under secure aggregation
Flower's ``secaggplus_mod`` then masks the update, so the server never sees it alone.

Messages use Flower's legacy FitIns/FitRes layout because SecAgg+ exists only on that path in
Flower 1.42. Privacy declarations travel as string metrics (``privacy.round-spend``,
``privacy.prior-spends``), which SecAgg+ passes through unmasked; besides them a reply's metrics
carry only the client id (:data:`REPLY_METRICS`). Nothing else about local training leaves the
node: its training loss, example and step counts and the update's norm before clipping stay in
the node's own training log (``training.jsonl`` in its state directory).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedpriv.clients.mods import make_policy_mod, make_secure_aggregation_mod
from fedpriv.clients.worker_threads import worker_threads_mod
from fedpriv.clients.node import is_real_node, node_name_and_state_dir, node_policy, record_budget
from fedpriv.clients.budget import BudgetExhausted, NodeBudgetGuard, open_guard
from fedpriv.clients.trainer import LocalTrainer, TrainResult, get_trainer
from fedpriv.common import rundir, secagg, user_dp
from fedpriv.common.accounting import merge_spends
from fedpriv.common.canaries import Canaries, GradientCanaries
from fedpriv.common.config import DataSection, RunConfig, config_from_run_config
from fedpriv.common.data import load_dataset, load_node_data
from fedpriv.common.errors import DataError
from fedpriv.common.fileio import append_private
from fedpriv.common.models import resolve_model_name
from fedpriv.common.partition import partition
from fedpriv.common.updates import round_clip
from fedpriv.common.protocol import (
    BUDGET_EXHAUSTED_CODE, CLIENT_ID, CLIENTS_SAMPLED, PRIOR_SPENDS, PRIVACY, REPLY_METRICS, ROUND_SPEND,
    RUN_HEAD, RUN_ID, SERVER_ROUND,
)
from fedpriv.common.witness import parse_node_run_head

RUN_MARKER = "fedpriv-run"
TRAINING_LOG = rundir.TRAINING_LOG  # the node's own per-round training figures, never sent


@functools.lru_cache(maxsize=4)
def _partitions(data: DataSection, seed: int, num_clients: int) -> list[np.ndarray]:
    dataset = load_dataset(data, seed)
    return partition(dataset.y_train, num_clients, data, seed)


def forget_partitions() -> None:
    """Drop this process's cached partitions (a simulation's driver, once it has planned)."""
    _partitions.cache_clear()


def local_data(cfg: RunConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """This simulated client's share of the training data (an index view, built once)."""
    if not 0 <= partition_id < cfg.federation.num_clients:
        raise DataError(
            f"partition {partition_id} is outside 0..{cfg.federation.num_clients - 1}"
        )
    dataset = load_dataset(cfg.data, cfg.run.seed)
    indices = _partitions(cfg.data, cfg.run.seed, cfg.federation.num_clients)[partition_id]
    return dataset.x_train[indices], dataset.y_train[indices]


def node_partition(context: Context, cfg: RunConfig) -> int:
    """The partition this virtual node trains on, checked against the configuration."""
    if "partition-id" not in context.node_config:
        raise DataError("this node has neither a data-path nor a partition-id in its node config")
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if partitions != cfg.federation.num_clients:
        raise DataError(
            f"the federation has {partitions} virtual nodes but federation.num_clients is "
            f"{cfg.federation.num_clients}; make them equal (flwr run: --federation-config "
            f"\"num-supernodes={cfg.federation.num_clients}\")"
        )
    return int(context.node_config["partition-id"])


@dataclass(frozen=True)
class NodeSetup:
    """Who this node is, what it trains on, and where it keeps its spending."""

    client_id: int  # declared in the reply's metrics (a simulation's server records spends under it)
    account: str  # the id the run's ledger records this node's spends under
    name: str
    x: np.ndarray
    y: np.ndarray
    state_dir: Path
    record_budget: float  # over every run (0: none)
    run_budget: float = 0.0  # within one fedpriv run, from the node's policy (0: none)


def node_setup(context: Context, cfg: RunConfig, dataset: Any, canaries: Canaries | None = None) -> NodeSetup:
    """A real node (``data-path`` in its node config, as ``fedpriv node join`` sets it) trains on
    its own file; a simulated one on its partition of the configured dataset, with its share of
    ``canaries`` appended (the empirical audit's, see :mod:`common.canaries`)."""
    config = context.node_config
    policy = node_policy(context)
    budget = record_budget(context, cfg, policy)
    per_run = policy.budget_per_run if policy is not None else 0.0
    if is_real_node(context):
        name, state_dir = node_name_and_state_dir(context, cfg)
        x, y = load_node_data(str(config["data-path"]), dataset.input_shape, dataset.num_classes,
                              cfg.data.label_column)
        # A deployment's server records spends under the node id the SuperLink authenticated
        # (server/strategy.py, account_of), a 64-bit number the reply's int metric cannot hold.
        return NodeSetup(int(context.node_id) % 2**31, str(int(context.node_id)), name, x, y, state_dir, budget,
                         per_run)
    partition_id = node_partition(context, cfg)
    x, y = local_data(cfg, partition_id)
    if canaries is not None:
        extra_x, extra_y = canaries.for_client(cfg.data, cfg.run.seed, cfg.federation.num_clients, partition_id)
        x, y = np.concatenate([x, extra_x]), np.concatenate([y, extra_y])
    name, state_dir = node_name_and_state_dir(context, cfg)
    return NodeSetup(partition_id, str(partition_id), name, x, y, state_dir, budget, per_run)


def log_training(state_dir: Path, server_round: int | None, run_id: str | None, result: TrainResult,
                 update_norm: float | None) -> None:
    """Append this round's training figures to the node's own log (``training.jsonl``, 0600).

    They are statistics of the node's private data that no accounting covers, so they stay here:
    the reply carries none of them (see docs/secure-aggregation.md, "What the server sees of each
    client").
    """
    line = {"round": server_round, "run_id": run_id, "train_loss": result.mean_loss,
            "examples": result.num_examples, "steps": result.steps}
    if update_norm is not None:
        line["update_norm"] = update_norm  # before user-level clipping: helps choose clipping_norm
    append_private(state_dir / TRAINING_LOG, (json.dumps(line, allow_nan=True) + "\n").encode())


def _prior_spending(context: Context, guard: NodeBudgetGuard, run_id: str | None) -> str:
    """What this node spent before this run, repeated in every reply: a reply can be lost (a
    dropout), and the server records the carried spending once, the first time it arrives.

    "This run" is the fedpriv run ``run_id`` the server names, which survives a server restart
    and resume: spends tagged with it are the run's own and never declared as prior. Without a
    run id (an older server), it is read once per Flower run and kept in the node's context.
    """
    if run_id:
        return json.dumps([s.to_json() for s in merge_spends(guard.spends_before(run_id))])
    record = context.state.config_records.get(RUN_MARKER)
    if record is None or PRIOR_SPENDS not in record:
        prior = json.dumps([s.to_json() for s in merge_spends(guard.spends)])
        record = ConfigRecord({PRIOR_SPENDS: prior})
        context.state.config_records[RUN_MARKER] = record
    return str(record[PRIOR_SPENDS])


def encode_update(
    cfg: RunConfig, start: list[np.ndarray], trained: list[np.ndarray], clients_sampled: int,
    random_bytes: secagg.RandomBytes = os.urandom, clip: float | None = None,
) -> tuple[list[np.ndarray], float | None]:
    """The update this client sends: ``trained - start``, clipped to the user-level norm (``clip``:
    the round's, with adaptive clipping; then its clipped-or-not value goes last) and, in
    distributed mode, rounded to integers with this client's share of the noise added.

    Returns the arrays and, with user-level DP, the update's L2 norm before clipping (None
    without): for the node's own log only, never for the reply.
    """
    delta = [np.asarray(t, dtype=np.float64) - np.asarray(s, dtype=np.float64)
             for s, t in zip(start, trained, strict=True)]
    norm: float | None = None
    noise = user_dp.noise_for(cfg, sum(a.size for a in delta), clip)
    if noise is not None:  # the client's half of the user-level mechanism (common/user_dp.py)
        delta, norm = noise.encode(delta, clients_sampled, random_bytes)
        if noise.integers:
            return delta, norm
    if not cfg.secure_aggregation.enabled:
        delta = [a.astype(np.float32) for a in delta]
    return delta, norm


def _refuse(msg: Message, reason: str) -> Message:
    return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=reason), reply_to=msg)


def make_client_app(config: RunConfig | None = None, extra_mods: list | None = None,
                    inner_mods: list | None = None, canaries: Canaries | GradientCanaries | None = None,
                    trainer_factory: Callable[..., LocalTrainer] = get_trainer) -> ClientApp:
    """The ClientApp. ``extra_mods`` run outermost (simulation fault injection uses them);
    ``inner_mods`` run inside secure aggregation and see the plain reply before it is masked;
    ``canaries`` join simulated nodes' training data (the empirical audit); ``trainer_factory``
    takes :class:`clients.trainer.LocalTrainer`'s arguments (tests inject faulty trainers).
    It pickles as these arguments (:class:`BuiltOnce`)."""
    return BuiltOnce(cloudpickle.dumps((config, extra_mods, inner_mods, canaries, trainer_factory)))


class BuiltOnce(ClientApp):
    """The ClientApp of :func:`make_client_app`, which each process builds once.

    Flower's simulation engine pickles the ClientApp into every message it hands a worker. The
    app's functions are closures, so it would travel whole each time (10 kB, about 3 ms of the
    engine's dispatching thread for every message of every SecAgg+ stage) and be rebuilt by the
    worker. This one pickles as the arguments it was made from, pickled once; a process builds
    the app from them the first time it sees them (:func:`built`) and keeps it."""

    def __init__(self, recipe: bytes) -> None:
        super().__init__()
        self.recipe = recipe

    def __call__(self, message: Message, context: Context) -> Message:
        return built(self.recipe)(message, context)

    def __reduce__(self) -> tuple:
        return built, (self.recipe,)


@functools.lru_cache(maxsize=8)
def built(recipe: bytes) -> ClientApp:
    """The ClientApp a :class:`BuiltOnce` recipe makes, built once per process."""
    return _build_client_app(*cloudpickle.loads(recipe))


def _build_client_app(config: RunConfig | None, extra_mods: list | None, inner_mods: list | None,
                      canaries: Canaries | GradientCanaries | None,
                      trainer_factory: Callable[..., LocalTrainer]) -> ClientApp:
    gradient_canaries = canaries if isinstance(canaries, GradientCanaries) else None
    if gradient_canaries is not None:  # the white-box audit: canaries in gradient space, not records
        from fedpriv.clients import whitebox

        canaries = None
        if trainer_factory is get_trainer:
            trainer_factory = whitebox.whitebox_trainer
    app = ClientApp(mods=[worker_threads_mod, *(extra_mods or []), make_policy_mod(config),
                          make_secure_aggregation_mod(config), *(inner_mods or [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_from_run_config(context.run_config, config)
        dataset = load_dataset(cfg.data, cfg.run.seed)
        node = node_setup(context, cfg, dataset, canaries)
        x, y = node.x, node.y
        model_name = resolve_model_name(cfg.model, dataset.input_shape)
        trainer = trainer_factory(
            model_name, cfg.model, cfg.client, cfg.dp, dataset.input_shape, dataset.num_classes
        )
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        weights = parameters_to_ndarrays(fitins.parameters)
        server_round = int(fitins.config.get(SERVER_ROUND, 0)) or None
        if gradient_canaries is not None:
            whitebox.attach(trainer, gradient_canaries, node.client_id, cfg.federation.num_clients, server_round)
        clients_sampled = int(fitins.config.get(CLIENTS_SAMPLED, cfg.clients_per_round()))
        clip = round_clip(cfg, fitins.config)
        run_id = str(fitins.config.get(RUN_ID, "")) or None
        run_head = parse_node_run_head(fitins.config.get(RUN_HEAD))  # witnessed in the node's ledger
        # The public record count the DP-SGD schedule is planned for, not len(y): the spend
        # declared below must not reveal how much data this node holds.
        schedule = cfg.schedule_examples(len(dataset.y_train))
        planned = trainer.planned_spend(schedule)
        # What the reply says besides the update (REPLY_METRICS): who the client is and, with
        # record-level DP, what it spent. Its loss, counts and update norm stay on the node.
        metrics: dict[str, int | str] = {CLIENT_ID: node.client_id}
        if planned is None:  # no record-level DP: nothing to spend, nothing to guard
            result = trainer.train(weights, x, y, schedule)
        else:
            with open_guard(node.state_dir, node.record_budget, cfg.privacy.delta) as guard:
                try:
                    guard.check(planned)
                    guard.check_run(planned, run_id, node.run_budget)
                except BudgetExhausted as exc:
                    return _refuse(msg, str(exc))
                prior = _prior_spending(context, guard, run_id)
                result = trainer.train(weights, x, y, schedule)
                # (the server computes its own epsilon)
                guard.record(result.spend, server_round, run_id, run_head=run_head, client_id=node.account)
                metrics[f"{PRIVACY}.{PRIOR_SPENDS}"] = prior
                metrics[f"{PRIVACY}.{ROUND_SPEND}"] = json.dumps(result.spend.to_json())
        update, norm = encode_update(cfg, weights, result.weights, clients_sampled, clip=clip)
        log_training(node.state_dir, server_round, run_id, result, norm)
        assert set(metrics) <= set(REPLY_METRICS), sorted(metrics)
        fitres = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters(update),
            num_examples=secagg.client_weight(cfg, result.num_examples),
            metrics=metrics,
        )
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app


app = make_client_app()
