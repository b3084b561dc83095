"""A simulation's CPU workers size TensorFlow's thread pools to the cores each one reserves
(simulations/workers.py), and nothing else's pools change."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from fedpriv.common.settings import resolve_config
from fedpriv.common.tf_runtime import limit_threads, tf
from fedpriv.simulations.run import client_mods
from fedpriv.simulations.workers import worker_threads_mod


def _fresh(code: str, tmp_path) -> None:
    """Run ``code`` in a new interpreter, where TensorFlow's runtime has not started."""
    env = {**os.environ, "FEDPRIV_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=180)


def test_limit_threads_sizes_the_pools_until_the_runtime_starts(tmp_path):
    _fresh(
        "from fedpriv.common.tf_runtime import limit_threads, tf\n"
        "threading = tf().config.threading\n"
        "def pools(): return threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()\n"
        "assert limit_threads(2.5) and pools() == (2, 2), pools()\n"
        "assert limit_threads(0.25) and pools() == (1, 1), pools()\n"  # a fraction of a core: one thread
        "tf().constant(1.0) + 1.0\n"  # the runtime starts: its pools are made
        "assert limit_threads(3) is False and pools() == (1, 1), pools()\n",
        tmp_path,
    )


def test_a_simulations_client_app_sizes_a_fresh_workers_pools_before_its_first_message(tmp_path):
    """The mod the simulation puts outermost, run as a Ray worker runs it: first thing in a
    process whose TensorFlow has not started, around the rest of the app."""
    _fresh(
        "from fedpriv.common.settings import resolve_config\n"
        "from fedpriv.common.tf_runtime import tf\n"
        "from fedpriv.simulations.run import client_mods\n"
        "cfg = resolve_config('quickstart', None, ['simulation.cpus_per_client=1'])\n"
        "outer, inner = client_mods(cfg, 0.0)\n"
        "assert outer[0]('message', 'context', lambda m, c: (m, c)) == ('message', 'context')\n"
        "threading = tf().config.threading\n"
        "assert threading.get_intra_op_parallelism_threads() == 1\n"
        "assert threading.get_inter_op_parallelism_threads() == 1\n",
        tmp_path,
    )


def test_the_sizing_is_for_cpu_workers_only_and_comes_before_fault_injection():
    cfg = resolve_config("quickstart", None, ["simulation.cpus_per_client=2"])
    outer, inner = client_mods(cfg, 0.0)
    assert len(outer) == 1 and outer[0].args == (2.0,) and inner == []
    assert client_mods(cfg, 0.25) == ([], [])  # a GPU worker keeps TensorFlow's defaults
    faulty = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, fail_clients="1"))
    outer, inner = client_mods(faulty, 0.0)
    assert len(outer) == 2 and outer[0].args == (2.0,) and len(inner) == 1


def test_a_process_whose_tensorflow_has_started_keeps_its_pools():
    """In-process simulations (the test suite's) run the same mod in a process already running
    TensorFlow: it changes nothing and the message goes through."""
    threading = tf().config.threading
    tf().constant(1.0) + 1.0
    before = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
    cores = before[0] + 5.0  # a size this process has not been asked for
    assert worker_threads_mod(cores)("m", "c", lambda m, c: "reply") == "reply"
    assert limit_threads(cores) is False
    assert (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()) == before
