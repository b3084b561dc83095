"""Import TensorFlow, tf-keras and TF Privacy the one way that works with this stack.

TF Privacy's DP optimizers subclass the legacy Keras 2 optimizers, so ``TF_USE_LEGACY_KERAS``
must be set before TensorFlow is first imported, in every process (Ray workers included).
``import tensorflow_privacy`` itself fails on TF >= 2.16 (its ``__init__`` pulls removed
estimator code), so the package flag ``sys.skip_tf_privacy_import`` is set and submodules are
imported directly. Every module of fedpriv that needs TensorFlow goes through :func:`tf`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

# Environment for this process and for any process it starts (Ray workers inherit it).
RUNTIME_ENV = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # oneDNN kernels for CPU ops; TensorFlow turns them on by default only on CPUs with AVX-512
    # VNNI or AMX. On AVX2 they make batched matrix products (the book-keeping Conv2D step) 2-4x
    # faster, and the seed CNN's non-private step about a tenth faster (benchmarks/dp_step.py).
    "TF_ENABLE_ONEDNN_OPTS": "1",
}
for _key, _value in RUNTIME_ENV.items():
    os.environ.setdefault(_key, _value)
sys.skip_tf_privacy_import = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Silence C++-level log lines (oneDNN, CUDA probing) printed straight to fd 2."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=1)
def tf() -> ModuleType:
    """Return the ``tensorflow`` module, imported once with GPU memory growth enabled."""
    verbose = os.environ.get("FEDPRIV_VERBOSE") == "1"
    with quiet_stderr(not verbose):
        import tensorflow as tensorflow_module

        if not verbose:
            tensorflow_module.get_logger().setLevel(logging.ERROR)
            logging.getLogger("absl").setLevel(logging.ERROR)
        enable_gpu_memory_growth(tensorflow_module)
    return tensorflow_module


def enable_gpu_memory_growth(tensorflow_module: Any) -> int:
    """Let several processes share a GPU: allocate memory on demand. Returns the GPU count."""
    gpus = tensorflow_module.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: growth can't change
            tensorflow_module.config.experimental.set_memory_growth(gpu, True)
    return len(gpus)


def limit_threads(cores: float) -> bool:
    """Let TensorFlow in this process run each op on ``max(1, int(cores))`` threads, and that many
    ops at a time, instead of one thread per core of the machine. For a process that has that many
    cores to itself: a simulation's Ray worker, which reserves ``simulation.cpus_per_client`` cores
    beside other workers on the same machine (:mod:`clients.worker_threads`). With TensorFlow's
    default each worker splits every op over all cores, and the workers' threads wait on each
    other's. Returns False, changing nothing, once this process's TensorFlow runtime has started
    (the thread pools are made then)."""
    threads = max(1, int(cores))
    threading = tf().config.threading
    try:
        threading.set_intra_op_parallelism_threads(threads)
        threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime has started: its pools are fixed
        return False
    return True


@functools.lru_cache(maxsize=1)
def keras() -> ModuleType:
    """Return ``tf_keras`` (Keras 2), which TF Privacy's optimizers require."""
    tf()
    import tf_keras

    return tf_keras


def gpu_count() -> int:
    """Number of GPUs TensorFlow can see in this process. On a machine without an NVIDIA device
    (:func:`nvidia_device_present`) it is 0 without importing TensorFlow, which takes seconds:
    ``fedpriv simulate`` asks before starting Ray."""
    if not nvidia_device_present():
        return 0
    return len(tf().config.list_physical_devices("GPU"))


def nvidia_device_present(dev: Path = Path("/dev")) -> bool:
    """Whether this machine has a device node of NVIDIA's driver (TensorFlow's GPUs are CUDA's):
    ``/dev/nvidiactl`` or ``/dev/nvidia<N>``, or ``/dev/dxg`` under WSL. Where in doubt it says
    yes: its callers then only do the slower, safe thing (ask TensorFlow; import no TensorFlow
    before a fork)."""
    return (dev / "nvidiactl").exists() or any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists()
