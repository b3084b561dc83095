"""`fedpriv simulate` on an existing Ray cluster: two raylets on this machine, as `ray start`
makes them on two machines (a head, then a worker that joins it), each with its own CPUs.

The run joins the cluster (``simulation.ray_address``) instead of starting Ray; its virtual
clients run as Flower's Ray actors on both raylets (the cluster's own actor table says where), and
keep their ledgers in ``client.state_dir``. What it spent must equal what a local run of the same
configuration and seed spent: the same epsilons in the summary, the same spends in the run
ledger and in each node's ledger.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv.common import checkpoint
from fedpriv.common.ledger import verify_ledger
from fedpriv.common.ledger_schema import Kind
from tests.conftest import free_port, simulate_run

pytestmark = pytest.mark.slow(cost=1.5)

RAY = str(Path(sys.executable).parent / "ray")
CPUS_PER_RAYLET = 1  # one ClientApp actor on each raylet (each is a TensorFlow process to start)
# The small MLP on scikit-learn's digits: what is tested is where clients run and what they spend.
SETTINGS = ["data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", "run.rounds=2",
            "federation.num_clients=4", "federation.min_available_clients=4", "client.local_epochs=1", "run.seed=7"]


class Cluster:
    """A head and one worker raylet, each from its own `ray start --block` in its own session (so
    that stopping them stops nothing else: `ray stop` would stop every Ray on this machine), under
    their own temporary directory (so no other Ray of this machine finds this cluster)."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs_dir = root, logs
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        common = ["--block", f"--num-cpus={CPUS_PER_RAYLET}", "--num-gpus=0", "--disable-usage-stats"]
        self._start([RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.root}",
                     "--include-dashboard=false", *common], env, "head")
        self._start([RAY, "start", f"--address={self.address}", *common], env, "worker")
        assert self.query("sum(1 for n in ray.nodes() if n['Alive'])") == 2, self.logs()

    def _start(self, argv: list[str], env: dict[str, str], name: str) -> None:
        """``ray start --block``, returned from once it says its raylet runs."""
        log = self.logs_dir / f"ray-{name}.log"
        with log.open("w") as handle:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert self.procs[-1].poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.2)

    def query(self, code: str, imports: str = "") -> object:
        """``code``'s last expression, evaluated by a driver connected to the cluster (JSON)."""
        script = (f"import json, ray\n{imports}\n"
                  f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                  f"print(json.dumps({code}))\n")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.logs_dir.glob("ray-*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path):
    root = Path(f"/tmp/fedpriv-test-ray-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700)
    made = Cluster(root, tmp_path)
    try:
        made.start()
        yield made
    finally:
        made.stop()
        shutil.rmtree(root, ignore_errors=True)


def _spends(run_dir: Path) -> list[tuple]:
    """The run ledger's record-level spends, without what differs between any two runs (times, run
    ids, hashes, signatures)."""
    ledger = verify_ledger(run_dir)
    assert ledger.ok, ledger.failures
    return sorted(_spend(e) for e in ledger.entries if e["kind"] == Kind.RECORD_LEVEL)


def _spend(entry: dict) -> str:
    """What a spend entry says (who, which round, what mechanism, what epsilon), as one string."""
    return json.dumps([entry[k] for k in ("actor", "round", "event", "sampling", "epsilon")], sort_keys=True)


def _node_spends(state_dir: Path) -> dict[str, list]:
    """Each node ledger's spends, in order, by node name."""
    nodes = {}
    for node in sorted(p for p in state_dir.iterdir() if p.is_dir()):
        ledger = verify_ledger(node)
        assert ledger.ok, ledger.failures
        nodes[node.name] = [_spend(e) for e in ledger.entries if e["kind"] == Kind.RECORD_LEVEL]
    return nodes


def test_a_simulation_on_a_ray_cluster_runs_clients_on_both_raylets_and_spends_what_a_local_run_spends(
        cluster, tmp_path):
    secret = base64.b64encode(checkpoint.new_key()).decode()  # the run's sealing key, in its environment
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, checkpoint.KEY_ENV: secret}
    out, state = tmp_path / "on-cluster", tmp_path / "shared/nodes"
    proc, summary = simulate_run(out, [*SETTINGS, f"simulation.ray_address={cluster.address}",
                                       f"client.state_dir={state}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    assert "Traceback" not in proc.stderr
    assert f"clients on the Ray cluster at {cluster.address}" in proc.stdout
    assert all(r["clients_trained"] == 4 and r["clients_failed"] == 0 for r in summary["rounds"])
    assert not (out / "nodes").exists()  # the nodes' state is where client.state_dir says

    # Where Flower's actors ran, from the cluster's own actor table: on both raylets. And, as
    # anyone with access to the cluster can, each job's runtime environment from its job table:
    # the run's gave the workers fedpriv's TensorFlow settings, and not the sealing key.
    seen = cluster.query(
        "{'placed': sorted({a['Address']['NodeID'] for a in ray._private.state.actors().values() "
        "if a['ActorClassName'].endswith('ClientAppActor')}), "
        "'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive']), "
        "'environments': [gcs_pb2.JobTableData.FromString(j).config.runtime_env_info.serialized_runtime_env "
        "for j in ray._private.state.state._connect_and_get_accessor().get_job_table("
        "skip_submission_job_info_field=True, skip_is_running_tasks_field=True)]}",
        imports="from ray.core.generated import gcs_pb2")
    assert len(seen["nodes"]) == 2 and seen["placed"] == seen["nodes"]
    assert any("TF_USE_LEGACY_KERAS" in e for e in seen["environments"]), seen["environments"]
    assert not any(secret in e for e in seen["environments"])

    # A local run of the same configuration and seed (its clients on threads of this process).
    local_out, local_state = tmp_path / "local", tmp_path / "local-nodes"
    proc, local = simulate_run(local_out, [*SETTINGS, f"client.state_dir={local_state}"], here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["privacy"] == local["privacy"]
    assert _spends(out) == _spends(local_out) and len(_spends(out)) == 8  # 4 clients x 2 rounds
    assert _node_spends(state) == _node_spends(local_state) and len(_node_spends(state)) == 4
