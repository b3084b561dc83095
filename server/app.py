"""The fedpriv ServerApp: FedAvg/FedAdam rounds under SecAgg+, server-side evaluation, the report.

Rounds run on Flower's ``DefaultWorkflow``; with secure aggregation on (the default) its fit step
is Flower's ``SecAggPlusWorkflow``, so the server only ever unmasks sums of client updates.

``app`` is what ``flwr run .`` loads; it reads the configuration from Flower's run config
(dotted keys, see pyproject.toml). ``fedpriv simulate`` builds its own with
:func:`make_server_app`, passing the validated configuration and a per-round callback.

With a sealing key in the environment the server seals a checkpoint after every round and the final
model, both bound to the run; with ``run.resume`` it continues the run from the checkpoint (see
:mod:`server.resume`). With no key neither is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedpriv.common import checkpoint, key_providers, rundir, secagg, user_dp
from fedpriv.common.canaries import CanaryClients
from fedpriv.common.config import RunConfig, config_from_run_config
from fedpriv.common.data import evaluation_set
from fedpriv.common.models import build_model, resolve_model_name
from fedpriv.common.tf_runtime import keras, tf
from fedpriv.server import resume
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.report import write_run
from fedpriv.server.run_log import RoundEntry, RunLog
from fedpriv.server.secagg_workflow import FedprivSecAggPlusWorkflow, federation_roster
from fedpriv.server.strategy import FedprivStrategy, ObservedGrid

log = logging.getLogger("fedpriv")


def make_server_app(
    config: RunConfig | None = None,
    out_dir: Path | None = None,
    on_round: Callable[[RoundEntry], None] | None = None,
    on_finish: Callable[[Path, dict], None] | None = None,
    on_exchange: Callable[[list, list], None] | None = None,
    strategy_factory: Callable[..., FedprivStrategy] = FedprivStrategy,
    canary_clients: CanaryClients | None = None,
) -> ServerApp:
    """The ServerApp. ``on_exchange(sent, replies)`` sees every message exchange (tests);
    ``strategy_factory`` takes :class:`server.strategy.FedprivStrategy`'s arguments (tests inject
    strategies that pause at a known point); ``canary_clients`` (the empirical audit's canary run
    only, :class:`common.canaries.CanaryClients`) join the strategy's user-level sums."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config_from_run_config(context.run_config, config)
        target = out_dir or Path(cfg.run.out_dir or rundir.default_run_dir(cfg.run.name))
        summary = run_server(grid, context, cfg, target, on_round, on_exchange, strategy_factory, canary_clients)
        # Through Flower's logger: in a deployment, `flwr run --stream` relays it to the submitter.
        logging.getLogger("flwr").info("fedpriv: run written to %s", target)
        if on_finish is not None:
            on_finish(target, summary)

    return app


def fit_workflow(cfg: RunConfig) -> Any:
    """Flower's SecAgg+ workflow (fedpriv's generator and roster) with the run's settings, or
    Flower's plain fit workflow."""
    sa = cfg.secure_aggregation
    if not sa.enabled:
        return None  # DefaultWorkflow's own
    shares, threshold = cfg.secagg_shares()
    return FedprivSecAggPlusWorkflow(
        roster=federation_roster(cfg),
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=secagg.flower_max_weight(cfg),
        clipping_range=secagg.flower_clipping_range(cfg),
        quantization_range=sa.quantization_range,
        modulus_range=secagg.MODULUS,
        timeout=sa.timeout,
    )


def nodes_are_authenticated(grid: Any) -> bool:
    """Whether the grid's replies come from nodes a SuperLink authenticated (a deployment: Flower's
    HTTP grid to the SuperLink, which fedpriv server start runs with node authentication), rather
    than from the virtual nodes of a simulation engine in this process (Flower's InMemoryGrid)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return not isinstance(grid, InMemoryGrid)


def run_server(grid: Grid, context: Context, cfg: RunConfig, out_dir: Path,
               on_round: Callable[[RoundEntry], None] | None = None,
               on_exchange: Callable[[list, list], None] | None = None,
               strategy_factory: Callable[..., FedprivStrategy] = FedprivStrategy,
               canary_clients: CanaryClients | None = None) -> dict:
    key_providers.open_configured()  # (a key in a PKCS#11 token: opened before TensorFlow starts)
    tf()
    dataset = evaluation_set(cfg.data, cfg.run.seed)
    model_name = resolve_model_name(cfg.model, dataset.input_shape)
    k = keras()
    k.utils.set_random_seed(cfg.run.seed)  # initial model only; clients' DP noise is unseeded
    model = build_model(model_name, cfg.model, dataset.input_shape, dataset.num_classes)
    model.compile(
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    initial = [np.asarray(w) for w in model.get_weights()]
    dimension = int(sum(w.size for w in initial))
    for warning in user_dp.preflight_warnings(cfg, dimension):
        log.info("fedpriv: %s", warning)
    run_log = RunLog(on_round=on_round)
    clock = {"round_start": time.perf_counter()}
    checkpoint_key = checkpoint.key_from_environment()
    point = None
    if cfg.run.resume:  # every check passes before anything in the run directory changes
        point = resume.inspect(out_dir, initial, cfg)
        resume.remaining_rounds(cfg, point, out_dir)
        run_log.restore(point.run_log)

    def evaluate(server_round: int, weights: list[np.ndarray]) -> tuple[float, float]:
        model.set_weights(weights)
        loss, accuracy = model.evaluate(dataset.x_test, dataset.y_test, batch_size=512, verbose=0)
        now = time.perf_counter()
        seconds = now - clock["round_start"] if server_round else None
        clock["round_start"] = now
        if server_round == 0 and point is not None:
            log.info("fedpriv: the model restored from round %d has accuracy %.4f", point.round, accuracy)
        else:  # (a restored run's history already holds its initial evaluation)
            run_log.record_evaluation(server_round, float(accuracy), float(loss), seconds)
        return float(loss), float(accuracy)

    recorder = PrivacyRecorder(cfg, out_dir, resume=point, flower_run_id=getattr(context, "run_id", None))
    strategy = strategy_factory(cfg, point.weights if point else initial, run_log, recorder, evaluate,
                               authenticated_nodes=nodes_are_authenticated(grid), canary_clients=canary_clients)
    before = 0.0
    if point is not None:
        strategy.round_offset = point.round
        strategy.restore_optimizer(point.optimizer)
        before = point.wall_time_s
        log.info("fedpriv: resuming %s after round %d of %d", out_dir, point.round, cfg.run.rounds)
    if checkpoint_key is not None:
        def save_checkpoint(server_round: int, weights: list[np.ndarray]) -> None:
            resume.save(out_dir / checkpoint.CHECKPOINT, checkpoint_key, server_round=server_round,
                        run=cfg.run.name, run_id=recorder.run_id, ledger_entries=recorder.ledger.seq,
                        ledger_head=recorder.ledger.prev_hash, weights=weights,
                        optimizer=strategy.optimizer_state(), run_log=run_log.state(),
                        wall_time_s=before + time.perf_counter() - clock["started"])

        strategy.on_round_end = save_checkpoint
    observed = ObservedGrid(grid, strategy, on_exchange)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.run.rounds - strategy.round_offset,
                            round_timeout=cfg.federation.round_timeout),
        strategy=strategy,
    )
    clock["started"] = time.perf_counter()
    DefaultWorkflow(fit_workflow=fit_workflow(cfg))(observed, legacy)
    if strategy.stopped:
        log.warning("fedpriv: %s", strategy.stopped)
    privacy = recorder.finish()
    extra = {
        "model": model_name,
        "model_parameters": dimension,
        "dataset": {
            "name": dataset.name,
            "train_examples": int(len(dataset.y_train)),
            "test_examples": int(len(dataset.y_test)),
            "num_classes": dataset.num_classes,
            "notes": list(dataset.notes),
        },
        "secure_aggregation": secagg.settings_summary(cfg, dimension),
        "wall_time_s": before + time.perf_counter() - clock["started"],
    }
    return write_run(out_dir, cfg, run_log, strategy.latest, extra, privacy, recorder, checkpoint_key)


app = make_server_app()
