"""A simulation's Ray passes objects of up to ``RAY_INLINE_BYTES`` inline, in the task's own
message, and keeps larger ones in its object store (simulations/run.py, ``backend_config``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

from fedpriv.common.settings import resolve_config
from fedpriv.simulations.run import RAY_INLINE_BYTES, backend_config

pytestmark = pytest.mark.slow(cost=0.1)


def test_a_simulations_ray_keeps_a_model_sized_result_out_of_its_object_store():
    """Ray started with the simulation's own arguments, as Flower starts it: a task's 500 KB
    result (a 100k-parameter model's weights are about 400 KB) is held by no node's object store,
    which is where Ray's default (100 KiB) would put it; one over the limit still is."""
    ray_dir = Path(tempfile.mkdtemp(prefix="fedpriv-ray-"))  # (short: Ray's socket paths are limited)
    with mock.patch.dict(os.environ):  # (backend_config sets this process's environment for Ray's workers)
        init_args = backend_config(resolve_config("quickstart", None, []), 0, False, ray_dir)["init_args"]
    assert RAY_INLINE_BYTES >= 500_000
    code = (
        "import ray, sys\n"
        f"ray.init(num_cpus=1, include_dashboard=False, **{init_args!r})\n"
        "@ray.remote\n"
        "def blob(n): return bytes(n)\n"
        "def stored(n):\n"
        "    ref = blob.remote(n); ray.wait([ref])\n"
        "    return bool(ray.experimental.get_object_locations([ref])[ref]['node_ids'])\n"
        f"print(stored(500_000), stored({2 * RAY_INLINE_BYTES}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"], done.stdout

