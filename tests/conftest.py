"""Shared test helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
