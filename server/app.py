"""The fedpriv ServerApp: FedAvg/FedAdam rounds, server-side evaluation, the run report.

``app`` is what ``flwr run .`` loads; it reads the configuration from Flower's run config
(dotted keys, see pyproject.toml). ``fedpriv simulate`` builds its own with
:func:`make_server_app`, passing the validated configuration and a per-round callback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import rundir
from common.config import RunConfig, config_from_run_config
from common.data import load_dataset
from common.models import build_model, resolve_model_name
from common.tf_runtime import keras, tf
from server.privacy import PrivacyRecorder, UserBudgetExhausted
from server.report import write_run
from server.run_log import RoundEntry, RunLog
from server.strategy import RecordingStrategy, build_strategy

log = logging.getLogger("fedpriv")


def make_server_app(
    config: RunConfig | None = None,
    out_dir: Path | None = None,
    on_round: Callable[[RoundEntry], None] | None = None,
    on_finish: Callable[[Path, dict], None] | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config_from_run_config(context.run_config, config)
        target = out_dir or Path(cfg.run.out_dir or rundir.default_run_dir(cfg.run.name))
        summary = run_server(grid, cfg, target, on_round)
        log.info("fedpriv: run written to %s", target)
        if on_finish is not None:
            on_finish(target, summary)

    return app


def run_server(grid: Grid, cfg: RunConfig, out_dir: Path,
               on_round: Callable[[RoundEntry], None] | None = None) -> dict:
    tf()
    dataset = load_dataset(cfg.data, cfg.run.seed)
    model_name = resolve_model_name(cfg.model, dataset.input_shape)
    k = keras()
    k.utils.set_random_seed(cfg.run.seed)  # initial model only; clients' DP noise is unseeded
    model = build_model(model_name, cfg.model, dataset.input_shape, dataset.num_classes)
    model.compile(
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    run_log = RunLog(on_round=on_round)
    clock = {"round_start": time.perf_counter()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = model.evaluate(dataset.x_test, dataset.y_test, batch_size=512, verbose=0)
        now = time.perf_counter()
        seconds = now - clock["round_start"] if server_round else None
        clock["round_start"] = now
        run_log.record_evaluation(server_round, float(accuracy), float(loss), seconds)
        return MetricRecord({"accuracy": float(accuracy), "loss": float(loss)})

    recorder = PrivacyRecorder(cfg, out_dir)
    strategy = RecordingStrategy(build_strategy(cfg), run_log, recorder, cfg)
    started = time.perf_counter()
    initial = ArrayRecord([np.asarray(w) for w in model.get_weights()])
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.run.rounds,
            timeout=cfg.federation.round_timeout,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate,
        )
        final_arrays = result.arrays if len(result.arrays) else initial
    except UserBudgetExhausted as stop:
        log.warning("fedpriv: %s", stop)
        final_arrays = strategy.latest_arrays or initial
    privacy = recorder.finish()
    extra = {
        "model": model_name,
        "dataset": {
            "name": dataset.name,
            "train_examples": int(len(dataset.y_train)),
            "test_examples": int(len(dataset.y_test)),
            "num_classes": dataset.num_classes,
            "notes": list(dataset.notes),
        },
        "wall_time_s": time.perf_counter() - started,
    }
    return write_run(out_dir, cfg, run_log, final_arrays.to_numpy_ndarrays(), extra, privacy, recorder)


app = make_server_app()
