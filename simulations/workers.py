"""What a simulation sets up in each Ray worker that runs its virtual clients.

Each worker reserves ``simulation.cpus_per_client`` cores (Flower's ``client_resources``), and Ray
starts as many workers as the reservation allows. TensorFlow, left to itself, makes each worker's
thread pools as large as the whole machine, so on 2 cores two workers run 4 op threads (plus their
inter-op threads) that wait on one another. :func:`worker_threads_mod`, the outermost mod of a
simulation's ClientApp, sizes each CPU worker's pools to its reservation
(:func:`common.tf_runtime.limit_threads`) before its first TensorFlow op. Measured side by side
on 2 cores, it made quickstart rounds about a fifth shorter, with and without DP (README,
Benchmark). Workers given a GPU keep TensorFlow's defaults (not measured on one).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flwr.app import Context, Message


def worker_threads_mod(cores: float) -> Callable[[Message, Context, Any], Message]:
    """A ClientApp mod that sizes this worker's TensorFlow thread pools to ``cores`` before the
    app's first message. For a process that runs one ClientApp at a time, as Ray's actors do; in a
    process whose TensorFlow runtime has started it changes nothing, so a process that runs
    ClientApps on several threads starts its runtime first (the test suite's in-process backend,
    tests/inprocess.py, does)."""
    return functools.partial(_sized_threads, float(cores))


def _sized_threads(cores: float, msg: Message, context: Context, call_next: Any) -> Message:
    _limit_once(cores)
    return call_next(msg, context)


@functools.lru_cache(maxsize=None)
def _limit_once(cores: float) -> bool:
    from fedpriv.common.tf_runtime import limit_threads

    return limit_threads(cores)
