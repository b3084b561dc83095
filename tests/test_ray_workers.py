"""What a simulation's Ray gives its workers, checked in one Ray instance started with the
simulation's own arguments: objects of up to ``RAY_INLINE_BYTES`` pass inline, in the task's own
message, and larger ones go to its object store (simulations/run.py, ``backend_config``); an actor
of Flower's kind runs TensorFlow on as many threads as Ray reserved cores for it, and one given a
GPU, the driver and a plain task change nothing (clients/worker_threads.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedpriv.common.settings import resolve_config
from fedpriv.simulations.run import RAY_INLINE_BYTES, backend_config

# (one group: the module's one Ray instance serves both tests on one xdist worker)
pytestmark = [pytest.mark.slow(cost=0.5), pytest.mark.xdist_group("test_ray_workers")]
WAIT_S = 120
LOCATION_WAIT_S = 5  # how long an object's location may take to reach its owner


def _log_tails(ray_dir: Path) -> str:
    """The last lines of Ray's own logs under ``ray_dir`` (what a failure reports)."""
    tails = []
    for log in sorted(ray_dir.glob("session_*/logs/*.err")) + sorted(ray_dir.glob("session_*/logs/raylet.out")):
        lines = log.read_text(errors="replace").splitlines()[-5:]
        if lines:
            tails.append(f"{log.name}: " + " | ".join(lines))
    return "; ".join(tails) or "none"


# Run in a fresh interpreter, as a simulation's driver: Ray with 3 CPUs and one GPU (Ray only
# counts it: no actor here imports TensorFlow's GPU support).
SCRIPT = """
import json, sys, time
import ray
from fedpriv.clients.worker_threads import ray_worker_cores

ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, object_store_memory=200 * 2**20, **INIT_ARGS)

def get(ref):
    if not ray.wait([ref], timeout=WAIT_S)[0]:
        sys.exit(f"no result from Ray in {WAIT_S} s")
    return ray.get(ref)

@ray.remote
def blob(n):
    return bytes(n)

def stored(n):
    # The object's owner learns where it is stored from the raylet after the task is done, so a
    # location may show up a moment after the result: ask again for a few seconds before saying no.
    ref = blob.remote(n)
    get(ref)
    deadline = time.monotonic() + LOCATION_WAIT_S
    while not ray.experimental.get_object_locations([ref])[ref]["node_ids"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

@ray.remote
def task_cores():
    return ray_worker_cores()

@ray.remote
class Worker:  # what a Flower ClientApp actor does with its first message
    def first_message(self):
        from fedpriv.clients.worker_threads import worker_threads_mod
        reply = worker_threads_mod("message", "context", lambda m, c: (m, c))
        answer = {"reply": list(reply), "cores": ray_worker_cores()}
        if "tensorflow" in sys.modules:
            from fedpriv.common.tf_runtime import limit_threads, tf
            threading = tf().config.threading
            def pools():
                return [threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()]
            answer["pools"] = pools()
            # then limit_threads's own rules: a fraction of a core is one thread, and once the
            # runtime has started (its first op) the pools stay as they are
            answer["limit_quarter"] = [limit_threads(0.25), pools()]
            tf().constant(1.0) + 1.0
            answer["limit_after_start"] = [limit_threads(3), pools()]
        return answer

print(json.dumps({
    "stored": [stored(500_000), stored(2 * RAY_INLINE_BYTES)],
    "driver_cores": ray_worker_cores(),
    "task_cores": get(task_cores.remote()),
    "cpu_actor": get(Worker.options(num_cpus=2).remote().first_message.remote()),
    "gpu_actor": get(Worker.options(num_cpus=1, num_gpus=0.5).remote().first_message.remote()),
}))
"""


@pytest.fixture(scope="module")
def ray_answers():
    """The script's answers, from Ray started with a simulation's own ``init_args`` (a small
    object store: the suite runs several Ray instances at once, each of which would otherwise
    size its store to 30% of the machine's memory)."""
    ray_dir = Path(tempfile.mkdtemp(prefix="fedpriv-ray-"))  # (short: Ray's socket paths are limited)
    init_args = backend_config(resolve_config("quickstart", None, []), 0, False, ray_dir)["init_args"]
    code = (f"INIT_ARGS = {init_args!r}\nWAIT_S = {WAIT_S}\nLOCATION_WAIT_S = {LOCATION_WAIT_S}\n"
            f"RAY_INLINE_BYTES = {RAY_INLINE_BYTES}\n" + SCRIPT)
    # As in a simulation: Flower's simulation module turns off Ray's `uv run` hook, which would
    # otherwise start the workers of a driver run under `uv run` (as `make test` runs the suite)
    # with that command, from a copy of the working directory, where a relative path to uv fails.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=3 * WAIT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"no answer from Ray in {3 * WAIT_S} s; its logs: {_log_tails(ray_dir)}") from exc
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_simulations_ray_keeps_a_model_sized_result_out_of_its_object_store(ray_answers):
    """A task's 500 KB result (a 100k-parameter model's weights are about 400 KB) is held by no
    node's object store, which is where Ray's default (100 KiB) would put it; one over the limit
    still is."""
    assert RAY_INLINE_BYTES >= 500_000
    assert ray_answers["stored"] == [False, True]


def test_a_ray_actor_runs_tensorflow_on_the_cores_ray_reserved_for_it(ray_answers):
    """An actor reserving 2 of the 3 cores gets pools of 2 threads before its first TensorFlow op,
    and the message goes through (then, in the same actor: a quarter core sizes them to one
    thread, and nothing resizes them once the runtime has started); an actor given a GPU, a plain
    task and the driver are left alone (the GPU actor never even imports TensorFlow)."""
    cpu, gpu = ray_answers["cpu_actor"], ray_answers["gpu_actor"]
    assert cpu == {"reply": ["message", "context"], "cores": 2.0, "pools": [2, 2],
                   "limit_quarter": [True, [1, 1]], "limit_after_start": [False, [1, 1]]}
    assert gpu == {"reply": ["message", "context"], "cores": None}
    assert ray_answers["driver_cores"] is None and ray_answers["task_cores"] is None
