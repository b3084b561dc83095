"""Shared test helpers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import common.tf_runtime  # noqa: F401  - sets TF_USE_LEGACY_KERAS before anything imports TF

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_fedpriv_home(tmp_path_factory):
    """Keys and node state go to a throwaway FEDPRIV_HOME, never the user's."""
    os.environ["FEDPRIV_HOME"] = str(tmp_path_factory.mktemp("fedpriv-home"))
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``fedpriv`` as a user would, in a fresh interpreter (``env``: its environment, default
    this process's)."""
    env = {**(os.environ if env is None else env), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedpriv", *args], cwd=cwd or ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def run_harness(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m tests.<module> ARGS`` (a simulation harness that captures what the server
    process sees) in a fresh interpreter."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    return subprocess.run([sys.executable, "-m", f"tests.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """The identity Flower's runtime gives a process, under which it creates messages (tests that
    create messages outside a Flower runtime set it; it is restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def simulate_run(out: Path, settings: list[str], preset: str = "quickstart", env: dict[str, str] | None = None,
                 resume: bool = False) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``fedpriv simulate`` with ``--set`` settings (``resume``: ``--resume out`` instead of
    ``--preset``/``--out``); its process and summary.json (None if absent)."""
    sets = [x for s in settings for x in ("--set", s)]
    if resume:
        args = ["simulate", "--resume", str(out), *sets]
    else:
        args = ["simulate", "--preset", preset, *sets, "--out", str(out)]
    proc = run_cli(*args, env=env)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return proc, summary


def dp_sgd_epsilon(spends: list, delta: float) -> float:
    """Record-level epsilon from dp-accounting directly (RDP): each spend (a DPSGDSpend) is
    ``steps`` Poisson-sampled Gaussian steps."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    for s in spends:
        gaussian = dp_accounting.GaussianDpEvent(s.noise_multiplier)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(s.sampling_probability, gaussian), s.steps)
    return accountant.get_epsilon(delta)
