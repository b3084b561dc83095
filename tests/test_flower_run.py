"""`flwr run .` runs fedpriv's ServerApp and ClientApp in Flower's own local simulation."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow(cost=2)


def _processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment has key=value: the local SuperLink this test started."""
    found = []
    needle = f"{key}={value}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_for_health(port: int, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Wait until the SuperLink at ``port`` answers its health check (what `flwr run` asks)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the local SuperLink did not start within {timeout:g} s: {log.read_text()[-3000:]}")


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to clean up the local SuperLink")
def test_flwr_run_dot(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "flwr is installed with the project"
    home, runs = tmp_path / "flwr-home", tmp_path / "runs"
    env = {**os.environ, "FLWR_HOME": str(home), "FEDPRIV_RUNS_DIR": str(runs),
           "FLWR_TELEMETRY_ENABLED": "0",
           # a local SuperLink of its own: on Flower's fixed default ports, `flwr run` would hand the
           # run to any other local SuperLink already there (another checkout's, or one a killed
           # test left), whose runs land in that SuperLink's runs directory
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # the small MLP on scikit-learn's digits: what is tested is Flower's runtime running the apps
    # (the seed CNN on the built-in data trains in tests/test_simulation_e2e.py)
    config = ("run.rounds=1 federation.num_clients=3 federation.min_available_clients=3 "
              'data.dataset="digits" model.name="mlp" '
              "client.local_epochs=1 client.batch_size=64 "
              "secure_aggregation.num_shares=3 secure_aggregation.reconstruction_threshold=2")
    # Flower's local SuperLink as `flwr run` starts it when none answers on these ports, plus
    # --disable-runtime-dependency-installation: otherwise each run first has `uv sync` install every
    # dependency into a fresh environment (30 s and a copy of TensorFlow), which tests Flower's
    # installer, not fedpriv's apps; `flwr run` finds it up and hands it the run.
    superlink = [str(Path(flwr).parent / "flower-superlink"), "--insecure", "--simulation",
                 "--isolation", "subprocess", "--control-api-address",
                 f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}", "--host", "127.0.0.1",
                 "--port", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], "--database", str(home / "state.db"),
                 "--disable-runtime-dependency-installation"]
    home.mkdir()
    try:
        with (tmp_path / "superlink.log").open("w") as log:
            started = subprocess.Popen(superlink, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_health(int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), started, tmp_path / "superlink.log")
        proc = subprocess.run(
            [flwr, "run", ".", "--run-config", config, "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "Starting local SuperLink" not in proc.stdout  # it ran on the SuperLink started here
        summaries = list(runs.glob("*/summary.json"))
        assert len(summaries) == 1, proc.stdout[-3000:]
        summary = json.loads(summaries[0].read_text())
        assert summary["config"]["federation"]["num_clients"] == 3
        assert (summary["config"]["data"]["dataset"], summary["config"]["model"]["name"]) == ("digits", "mlp")
        assert [r["round"] for r in summary["rounds"]] == [1]
        assert summary["rounds"][0]["clients_trained"] == 3
        assert sorted(summary["privacy"]["record_level"]["clients"]) == ["0", "1", "2"]
        assert summary["final_accuracy"] > summary["initial_accuracy"]
        assert summary["secure_aggregation"]["enabled"] and summary["secure_aggregation"]["num_shares"] == 3
    finally:
        for pid in _processes_with_env("FLWR_HOME", str(home)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
