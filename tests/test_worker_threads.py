"""A simulation's CPU workers size TensorFlow's thread pools to the cores each one reserves
(clients/worker_threads.py, the ClientApp's outermost mod), and nothing else's pools change. In
real Ray actors, with :func:`common.tf_runtime.limit_threads`'s rules: tests/test_ray_workers.py."""

from __future__ import annotations

import dataclasses

from fedpriv.common.settings import resolve_config
from fedpriv.common.tf_runtime import limit_threads, tf
from fedpriv.clients.app import app, built, make_client_app
from fedpriv.clients.worker_threads import sized_threads, worker_threads_mod
from fedpriv.simulations.run import client_mods


def test_the_sizing_is_the_apps_outermost_mod_under_every_runner_and_fault_injection_comes_next():
    """The ClientApp that `fedpriv simulate` and `flwr run .` both run (``fedpriv.client_app``
    builds it with no extra mods) sizes the pools before anything else; the simulation's fault
    injection adds its crash-or-hang mod next and its malformed replies inside."""
    cfg = resolve_config("quickstart", None, [])
    assert client_mods(cfg) == ([], [])
    plain = built(app.recipe)._mods
    assert plain[0] is worker_threads_mod and worker_threads_mod not in plain[1:]
    faulty = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, fail_clients="1"))
    outer, inner = client_mods(faulty)
    assert len(outer) == 1 and len(inner) == 1
    mods = built(make_client_app(faulty, extra_mods=outer, inner_mods=inner).recipe)._mods
    # (the app is built from its pickled recipe: the fault mods are copies)
    names = [getattr(mod, "__qualname__", None) for mod in mods]
    assert mods[0] is worker_threads_mod and len(mods) == len(plain) + 2
    assert names[1] == outer[0].__qualname__ and names[-1] == inner[0].__qualname__


def test_a_process_whose_tensorflow_has_started_keeps_its_pools():
    """In-process simulations (the test suite's) run the same mod in a process that is no Ray
    actor and already runs TensorFlow: it changes nothing and the message goes through."""
    threading = tf().config.threading
    tf().constant(1.0) + 1.0
    before = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
    cores = before[0] + 5.0  # a size this process has not been asked for
    assert worker_threads_mod("m", "c", lambda m, c: "reply") == "reply"
    assert sized_threads() is None and limit_threads(cores) is False
    assert (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()) == before
