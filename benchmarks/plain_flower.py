"""The quickstart's learning job written directly on Flower 1.42 and tf-keras: no DP, no SecAgg+.

The baseline ``flower_baseline.py`` measures fedpriv against (see there for what is the same on
both sides). Each client trains with Keras's own ``train_step``, traced once for any batch size,
as fedpriv's trainer does, so the comparison measures what fedpriv adds around training rather
than how Keras is called. It is a module of its own because Flower hands the ClientApp to its Ray workers by
pickling it: defined here, the workers import it by name and keep one compiled model each
(:data:`_WORKER`), as a reasonable hand-written Flower app would; defined in a ``__main__``
script, it would arrive as a fresh copy with every message and rebuild the model each time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.common.tf_runtime import RUNTIME_ENV

os.environ.update(RUNTIME_ENV)  # the same TensorFlow settings as fedpriv's processes (workers inherit them)

import tensorflow as tf  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

JOB_ENV = "PLAIN_FLOWER_JOB"  # rounds,clients,seed: how the workers learn the job
_WORKER: dict[str, Any] = {}  # this process's compiled model and partitions
EVALUATIONS: list[dict] = []  # the server's evaluation after each round (the driver's process)


def learning_job() -> Any:
    """The quickstart's configuration without DP and SecAgg+ (the learning job alone): the one
    ``fedpriv simulate --preset no-dp`` runs in the comparison."""
    from flower_baseline import NO_SECAGG, job_settings

    from fedpriv.common.config import load_config
    from fedpriv.common.presets import preset_layers

    rounds, clients, seed = (int(v) for v in os.environ[JOB_ENV].split(","))
    return load_config(preset_layers("no-dp"), [*job_settings(rounds, clients, seed), NO_SECAGG])


def dataset(cfg: Any) -> Any:
    from fedpriv.common.data import load_dataset

    return load_dataset(cfg.data, cfg.run.seed)


def model(cfg: Any) -> Any:
    from fedpriv.common.models import build_model

    data = dataset(cfg)
    m = build_model("cnn", cfg.model, data.input_shape, data.num_classes)
    m.compile(optimizer=tf.keras.optimizers.legacy.SGD(cfg.client.learning_rate, momentum=cfg.client.momentum),
              loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return m


class Client(NumPyClient):
    def __init__(self, partition: int) -> None:
        from fedpriv.common.partition import partition as split

        if "model" not in _WORKER:
            cfg = learning_job()
            data = dataset(cfg)
            m = model(cfg)
            # Keras's own train step, traced once for any batch size (Poisson batches change size every
            # step; ``train_on_batch`` would pay its per-call overhead and retrace for new sizes)
            spec = [tf.TensorSpec([None, *data.input_shape], tf.float32), tf.TensorSpec([None], tf.int64)]
            step = tf.function(lambda x, y: m.train_step((x, y))["loss"], input_signature=spec)
            _WORKER.update(cfg=cfg, data=data, model=m, step=step,
                           parts=split(data.y_train, cfg.federation.num_clients, cfg.data, cfg.run.seed))
        self.cfg, self.model, self.step = _WORKER["cfg"], _WORKER["model"], _WORKER["step"]
        index = _WORKER["parts"][partition]
        self.x, self.y = _WORKER["data"].x_train[index], _WORKER["data"].y_train[index]

    def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
        m, client = self.model, self.cfg.client
        m.set_weights(parameters)
        for variable in m.optimizer.variables():  # fresh optimizer state each round
            variable.assign(tf.zeros_like(variable))
        n = len(self.y)
        q = client.batch_size / n
        rng = np.random.default_rng()
        for _ in range(client.local_epochs * math.ceil(n / client.batch_size)):
            chosen = np.flatnonzero(rng.random(n) < q)  # Poisson batches
            if len(chosen):
                self.step(self.x[chosen], self.y[chosen].astype(np.int64))
        return m.get_weights(), n, {}


def client_fn(context: Context) -> Any:
    return Client(int(context.node_config["partition-id"])).to_client()


def server_fn(context: Context) -> ServerAppComponents:
    cfg = learning_job()
    data = dataset(cfg)
    tf.keras.utils.set_random_seed(cfg.run.seed)  # the initial model, as fedpriv's server makes it
    server_model = model(cfg)
    initial = ndarrays_to_parameters(server_model.get_weights())

    def evaluate(server_round: int, parameters: list, config: dict) -> tuple[float, dict]:
        server_model.set_weights(parameters)
        loss, accuracy = server_model.evaluate(data.x_test, data.y_test, batch_size=512, verbose=0)
        EVALUATIONS.append({"round": server_round, "time": time.perf_counter(), "accuracy": float(accuracy)})
        return float(loss), {"accuracy": float(accuracy)}

    federation = cfg.federation
    strategy = FedAvg(fraction_fit=federation.fraction_train, fraction_evaluate=0.0,
                      min_fit_clients=federation.min_train_clients, min_evaluate_clients=0,
                      min_available_clients=federation.min_available_clients,
                      initial_parameters=initial, evaluate_fn=evaluate)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.run.rounds))


def run(rounds: int, clients: int, seed: int, out: Path, cpus: float = 1.0) -> None:
    """Run the job in this process (Ray workers for the clients); write per-round times and the
    final accuracy to ``out``."""
    from flwr.simulation import run_simulation

    os.environ[JOB_ENV] = f"{rounds},{clients},{seed}"  # before Ray starts: its workers inherit it
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"logging_level": logging.ERROR, "log_to_driver": False,
                                                 "_temp_dir": tempfile.mkdtemp(prefix="fedpriv-plain-ray-")}})
    times = [e["time"] for e in EVALUATIONS]
    out.write_text(json.dumps({
        "round_seconds": [b - a for a, b in zip(times, times[1:])],
        "final_accuracy": EVALUATIONS[-1]["accuracy"] if EVALUATIONS else None,
        "rounds": len(EVALUATIONS) - 1,
    }))
