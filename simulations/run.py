"""Local federation simulation: the fedpriv ServerApp and ClientApp on Flower's Ray runtime."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedpriv.clients.app import forget_partitions, local_data, make_client_app
from fedpriv.common import checkpoint, keyfiles, secret_env, user_dp
from fedpriv.common.canaries import Canaries, CanaryClients, GradientCanaries
from fedpriv.common.config import ConfigError, RunConfig
from fedpriv.common.data import Dataset, evaluation_set, forget_loaded, load_dataset
from fedpriv.common.errors import FedprivError
from fedpriv.common.models import build_model, parameter_count, resolve_model_name
from fedpriv.common.tf_runtime import RUNTIME_ENV, gpu_count, quiet_stderr
from fedpriv.server import resume
from fedpriv.server.app import make_server_app
from fedpriv.server.resume import RestorePoint
from fedpriv.server.run_log import RoundEntry
from fedpriv.simulations.faults import make_fault_mods

RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable for the cluster to join


@dataclass(frozen=True)
class Plan:
    """What a run will do, checked before any process is started."""

    dataset: Dataset
    model_name: str
    client_sizes: list[int]
    gpus_per_client: float
    model_parameters: int
    warnings: list[str]
    restore: RestorePoint | None = None  # where a resumed run continues (run.resume)


def plan(cfg: RunConfig) -> Plan:
    """Load and check data, model fit and partitions; fail early with one clear line."""
    cluster = ray_address(cfg)
    if cluster and not cfg.client.state_dir:
        raise ConfigError(f"the virtual clients run on the Ray cluster at {cluster}, so their ledgers need a "
                          "directory every machine of it sees: set client.state_dir (a shared filesystem)")
    if cluster:
        check_reachable(cluster)
    dataset = load_dataset(cfg.data, cfg.run.seed)
    model_name = resolve_model_name(cfg.model, dataset.input_shape)
    sizes = [len(local_data(cfg, pid)[1]) for pid in range(cfg.federation.num_clients)]
    if min(sizes) == 0:
        raise FedprivError("a client received no training data; use fewer clients or iid partitioning")
    gpus = cfg.simulation.gpus_per_client if gpu_count() > 0 else 0.0
    # (counted from the architecture: no TensorFlow devices or model are set up before Ray starts)
    dimension = parameter_count(model_name, cfg.model, dataset.input_shape, dataset.num_classes)
    warnings = user_dp.preflight_warnings(cfg, dimension)  # raises ConfigError if unworkable
    if cluster and _sealed_data(cfg):
        warnings.append(f"{cfg.data.path} is sealed: on the Ray cluster each virtual client opens it with the "
                        f"sealing key of the machine it runs on (${checkpoint.KEY_FILE_ENV} where its raylet "
                        "was started); this machine's key is never sent through the cluster")
    # A configured but unusable checkpoint key fails here; with none configured, the default
    # key (created on first use) seals a checkpoint after every round, so any run can resume.
    if not cfg.run.resume:  # (a resume never creates a key: it needs the one the run used)
        checkpoint.ensure_key()
    restore = None
    if cfg.run.resume:  # key, checkpoint, model and ledger: refused here, before any process starts
        model = build_model(model_name, cfg.model, dataset.input_shape, dataset.num_classes)
        restore = resume.inspect(Path(cfg.run.out_dir), [np.asarray(w) for w in model.get_weights()], cfg)
    return Plan(evaluation_set(cfg.data, cfg.run.seed), model_name, sizes, gpus, dimension, warnings, restore)


def ray_address(cfg: RunConfig, env: dict[str, str] | None = None) -> str:
    """The Ray cluster the virtual clients run on: ``simulation.ray_address``, else ``$RAY_ADDRESS``;
    empty (or ``local``) for a Ray instance started for this run alone."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    address = (cfg.simulation.ray_address or env.get(RAY_ADDRESS_ENV, "")).strip()
    return "" if address == "local" else address


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a cluster address (``host:port``) nothing answers at, in seconds: Ray itself would
    retry for minutes. (``auto`` and ``ray://`` addresses are left to Ray.)"""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"simulation.ray_address must be host:port (a Ray head's GCS port, such as "
                          f"head:6379) or auto, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FedprivError(f"cannot join the Ray cluster at {address}: "
                           f"{exc.strerror or exc.__class__.__name__.lower()}") from None


def _sealed_data(cfg: RunConfig) -> bool:
    return cfg.data.dataset == "file" and bool(cfg.data.path) and checkpoint.is_sealed(Path(cfg.data.path))


def join_cluster(address: str, verbose: bool) -> dict[str, float]:
    """Connect this process to the Ray cluster at ``address`` (Flower's backend then finds Ray
    started and uses it); return the cluster's resources. The cluster's workers were started by
    its raylets, not by this process, so they get the TensorFlow settings of
    :mod:`common.tf_runtime` (and this process's module path, as Flower would give them) through
    the job's runtime environment. Secrets never travel that way: the cluster keeps a job's
    runtime environment where anyone with access to the cluster can read it."""
    import ray

    pythonpath = os.pathsep.join(p for p in sys.path if p)
    try:
        with quiet_stderr(not verbose):  # (Ray's C++ client logs each failed attempt there)
            ray.init(address=address, runtime_env={"env_vars": {**RUNTIME_ENV, "PYTHONPATH": pythonpath}},
                     logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FedprivError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


RAY_INLINE_BYTES = 2**20
# Ray passes a task's arguments and results of up to 100 KiB inline, in the task's own message,
# and puts larger ones in its shared-memory object store, which costs each a store round trip.
# A simulation's messages go to one virtual client each and are read once, and those of the
# 100k-parameter models (about 400 KB of weights) pay for the store: an actor call echoing
# 400 KB took 6.0-6.5 ms through the store and 3.1-3.4 ms inline on 2 cores; at 1 MB the two
# were level, and from 2 MB the store was faster (8.9 ms against 10.6 ms; 4 MB, 12.1 against
# 19.2). So objects up to RAY_INLINE_BYTES travel inline. In simulations of 50 clients of the
# 100k MLP (two pairs each), a training message's trip through Flower's Ray backend took 31 ms
# against 40-49 ms, rounds 1.16-1.20 s against 1.39-1.63 s; with SecAgg+, the masked-vector
# exchange took 53-55 ms a client against 65 ms, rounds 2.6 s against 2.85-3.0 s.
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": RAY_INLINE_BYTES}


def backend_config(cfg: RunConfig, gpus_per_client: float, verbose: bool,
                   ray_dir: Path | None = None, joined: bool = False) -> dict[str, Any]:
    """Flower's backend configuration for Ray. ``ray_dir``: Ray's temporary directory (its session
    files and logs), which would otherwise be the world-accessible ``/tmp/ray``. ``joined``: this
    process has joined a cluster (:func:`join_cluster`), whose workers it did not start."""
    # Ray workers started for this run inherit this process's environment, which
    # common.tf_runtime has prepared (Flower sets Ray's runtime_env itself, so it cannot be
    # passed here).
    os.environ.update(RUNTIME_ENV)
    # Key material stays out of the workers (common/secret_env.py) unless they read a sealed data file.
    if not joined and _sealed_data(cfg):
        os.environ.update(secret_env.for_child(checkpoint.KEY_ENV, keyfiles.PASSPHRASE_ENV))
    return {
        "client_resources": {
            "num_cpus": cfg.simulation.cpus_per_client,
            "num_gpus": gpus_per_client,
        },
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            **({"_temp_dir": str(ray_dir)} if ray_dir is not None else {}),
            # (a joined cluster keeps its own settings: Ray takes them only where it starts one)
            **({} if joined else {"_system_config": RAY_SYSTEM_CONFIG}),
        },
        # Let Flower's Ray actors turn on TensorFlow GPU memory growth as well.
        "actor": {"tensorflow": 1 if gpus_per_client > 0 else 0},
    }


def client_mods(cfg: RunConfig) -> tuple[list, list]:
    """The simulation's own mods around the ClientApp: (outermost, inside secure aggregation):
    fault injection's crash and hang, and its malformed replies (:mod:`simulations.faults`). (The
    app's own outermost mod sizes each Ray worker's TensorFlow threads: clients/worker_threads.py.)"""
    if not cfg.simulation.fail_clients:
        return [], []
    crash_or_hang, malformed = make_fault_mods(cfg)
    return [crash_or_hang], [malformed]


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's per-message logging out of the progress display unless --verbose.

    Flower configures its logger when first imported, so this runs after that import.
    """
    flower = logging.getLogger("flwr")
    flower.propagate = False
    if not verbose:
        flower.setLevel(logging.CRITICAL)


def simulate(
    cfg: RunConfig,
    out_dir: Path,
    *,
    verbose: bool = False,
    on_round: Callable[[RoundEntry], None] | None = None,
    run_plan: Plan | None = None,
    canaries: Canaries | GradientCanaries | None = None,
    canary_clients: CanaryClients | None = None,
) -> dict[str, Any]:
    """Run the whole federation in this process; return the run summary. ``canaries`` join the
    clients' training data or DP-SGD steps, and ``canary_clients`` the server's user-level sums
    (the empirical audit's canary run)."""
    with quiet_stderr(not verbose):  # Flower's simulation imports TensorFlow, which logs from C++ as it loads
        from flwr.simulation import run_simulation

    from fedpriv.simulations import vce_poll

    vce_poll.install()
    run_plan = run_plan or plan(cfg)
    # The clients load the training data where they run; this process keeps the evaluation set.
    forget_loaded()
    forget_partitions()
    quiet_flower(verbose)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if run_plan.gpus_per_client > 0 or gpu_count() == 0:
        # Ray only needs to hide GPUs from actors that asked for none on a GPU machine; in every
        # other case opt in to its future behaviour, which also silences its FutureWarning.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    finished: dict[str, Any] = {}

    def on_finish(path: Path, summary: dict[str, Any]) -> None:
        finished["summary"] = summary

    gpus, ray_dir, cluster = run_plan.gpus_per_client, None, ray_address(cfg)
    if cluster:
        resources = join_cluster(cluster, verbose)
        gpus = cfg.simulation.gpus_per_client if resources.get("GPU", 0) > 0 else 0.0
    else:  # owner-only (mkdtemp makes it 0700) and short: Ray puts its sockets under it
        ray_dir = Path(tempfile.mkdtemp(prefix="fedpriv-ray-"))
        os.environ.pop(RAY_ADDRESS_ENV, None)  # (simulation.ray_address = local): Ray would join it
    outer_mods, inner_mods = client_mods(cfg)
    try:
        run_simulation(
            server_app=make_server_app(cfg, out_dir=out_dir, on_round=on_round, on_finish=on_finish,
                                       canary_clients=canary_clients),
            client_app=make_client_app(cfg, extra_mods=outer_mods, inner_mods=inner_mods, canaries=canaries),
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg, gpus, verbose, ray_dir, joined=bool(cluster)),
            verbose_logging=verbose,
        )
    finally:
        if ray_dir is not None:
            shutil.rmtree(ray_dir, ignore_errors=True)
    if "summary" not in finished:
        raise FedprivError("the simulation ended without a result (run with --verbose for details)")
    return finished["summary"]
