"""A simulation's Ray passes objects of up to ``RAY_INLINE_BYTES`` inline, in the task's own
message, and keeps larger ones in its object store (simulations/run.py, ``backend_config``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedpriv.common.settings import resolve_config
from fedpriv.simulations.run import RAY_INLINE_BYTES, backend_config

pytestmark = pytest.mark.slow(cost=0.5)
WAIT_S = 120


def _log_tails(ray_dir: Path) -> str:
    """The last lines of Ray's own logs under ``ray_dir`` (what a failure reports)."""
    tails = []
    for log in sorted(ray_dir.glob("session_*/logs/*.err")) + sorted(ray_dir.glob("session_*/logs/raylet.out")):
        lines = log.read_text(errors="replace").splitlines()[-5:]
        if lines:
            tails.append(f"{log.name}: " + " | ".join(lines))
    return "; ".join(tails) or "none"


def test_a_simulations_ray_keeps_a_model_sized_result_out_of_its_object_store():
    """Ray started with the simulation's own arguments, as Flower starts it: a task's 500 KB
    result (a 100k-parameter model's weights are about 400 KB) is held by no node's object store,
    which is where Ray's default (100 KiB) would put it; one over the limit still is."""
    ray_dir = Path(tempfile.mkdtemp(prefix="fedpriv-ray-"))  # (short: Ray's socket paths are limited)
    init_args = backend_config(resolve_config("quickstart", None, []), 0, False, ray_dir)["init_args"]
    assert RAY_INLINE_BYTES >= 500_000
    # (a small object store: the suite runs several Ray instances at once, each of which would
    # otherwise size its store to 30% of the machine's memory)
    code = (
        "import ray, sys\n"
        f"ray.init(num_cpus=1, include_dashboard=False, object_store_memory=200 * 2**20, **{init_args!r})\n"
        "@ray.remote\n"
        "def blob(n): return bytes(n)\n"
        "def stored(n):\n"
        "    ref = blob.remote(n)\n"
        "    if not ray.wait([ref], timeout=WAIT_S)[0]: sys.exit(f'no result from Ray in {WAIT_S} s')\n"
        "    return bool(ray.experimental.get_object_locations([ref])[ref]['node_ids'])\n"
        f"WAIT_S = {WAIT_S}\n"
        f"print(stored(500_000), stored({2 * RAY_INLINE_BYTES}))\n"
    )
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
    assert done.stdout.split() == ["False", "True"], done.stdout

