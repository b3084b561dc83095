"""TensorFlow's thread pools in a Ray worker, sized to the cores Ray reserved for it.

Flower's simulation engine runs virtual clients in Ray actors, each reserving its backend's
``client_resources`` (``num_cpus`` cores; ``fedpriv simulate`` sets it from
``simulation.cpus_per_client``, and ``flwr run .`` from the federation config's
``client-resources-num-cpus``, 2 by default), and Ray starts as many actors as the
reservations allow. TensorFlow, left to itself, makes each process's thread pools as large as the
whole machine, so on 2 cores two actors run 4 op threads (plus their inter-op threads) that wait
on one another. :func:`worker_threads_mod`, the ClientApp's outermost mod, sizes an actor's pools
to the cores Ray assigned it (:func:`common.tf_runtime.limit_threads`) before its first
TensorFlow op. It reads the assignment from Ray itself (:func:`ray_worker_cores`), so both ways of
running a simulation get the same sizing. Measured side by side on 2 cores, it made quickstart
rounds about a fifth shorter, with and without DP (README, Benchmark).

Everywhere else it changes nothing: an actor given a GPU keeps TensorFlow's defaults (not
measured on one), and so does every process that is not a Ray actor (a deployed node's ClientApp
task, the test suite's in-process simulations).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (Flower's app package costs 0.5 s of CPU to import; annotations only)
    from flwr.app import Context, Message


def ray_worker_cores() -> float | None:
    """The CPU cores Ray reserved for this process, where it is a Ray actor given CPUs and no
    GPU; otherwise None. Imports nothing: a process that has not imported Ray is no Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # a driver or a plain task: not where Flower's clients run
        return None
    assigned = context.get_assigned_resources()
    if assigned.get("GPU", 0) > 0 or assigned.get("CPU", 0) <= 0:
        return None
    return float(assigned["CPU"])


def worker_threads_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """A ClientApp mod: before this process's first message, size its TensorFlow pools to the
    cores of its Ray actor (nothing outside one). In a process whose TensorFlow runtime has
    already started it changes nothing (the pools are made then)."""
    sized_threads()
    return call_next(msg, context)


@functools.lru_cache(maxsize=1)
def sized_threads() -> float | None:
    """Size this process's pools once, as :func:`worker_threads_mod` does; returns the cores it
    sized them to (None: left as they were)."""
    cores = ray_worker_cores()
    if cores is None:
        return None
    from fedpriv.common.tf_runtime import limit_threads

    return cores if limit_threads(cores) else None
