"""Load: 50 clients per round for 10 rounds completes with no lost update and no memory growth
across rounds (peak RSS of the whole process tree in the last round at most 1.1x that in round 2).

The load is the federation's (50 clients a round through Ray, DP-SGD and SecAgg+), not the model's:
the small MLP on scikit-learn's digits keeps each client's training short (the seed CNN on the
built-in MNIST digits trains in tests/test_simulation_e2e.py and tests/test_tutorial.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import shutil
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.scale import descendants, rss_bytes
from fedpriv.common import checkpoint
from fedpriv.common.ledger import verify_ledger
from tests.conftest import ROOT, assert_private

CLIENTS, ROUNDS = 50, 10
GROWTH_LIMIT = 1.1
ROUND_LINE = re.compile(r"^round (\d+)/(\d+)\s")


@pytest.mark.slow(cost=3)
def test_fifty_clients_a_round_for_ten_rounds_lose_nothing_and_do_not_grow(tmp_path):
    out = tmp_path / "run"
    settings = [f"federation.num_clients={CLIENTS}", f"federation.min_available_clients={CLIENTS}",
                "federation.fraction_train=1.0", f"run.rounds={ROUNDS}", "client.batch_size=64",
                "data.dataset=digits", "model.name=mlp",
                # SecAgg+ with its default share count (5 shares, 3 to rebuild a secret), as users run it
                "secure_aggregation.num_shares=5", "secure_aggregation.reconstruction_threshold=3",
                # two CPUs a client: one Ray worker on a 2-core machine (the load is the federation's)
                "simulation.cpus_per_client=2"]
    args = [sys.executable, "-m", "fedpriv", "simulate", "--preset", "quickstart", "--out", str(out)]
    args += [x for s in settings for x in ("--set", s)]
    # A fresh home, a temporary directory of its own (short: Ray puts sockets under it) and the
    # umask most systems have: what the run writes must be owner-only all the same.
    scratch = Path(tempfile.mkdtemp())
    # The sealing key given in the environment: the run seals with it, and none of the processes the
    # command starts (Ray's, the workers running the clients) inherits it (common/secret_env.py).
    key = checkpoint.new_key()
    key_text = base64.b64encode(key).decode()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "FEDPRIV_HOME": str(tmp_path / "home"), "TMPDIR": str(scratch), checkpoint.KEY_ENV: key_text}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o022))
    current = {"round": 1}  # the round in progress: samples count towards it
    peaks: dict[int, int] = defaultdict(int)
    stop = threading.Event()
    seen: dict[int, bool] = {}  # child pid -> whether its environment holds the key
    root_cmdline: list[bytes] = []

    def sample() -> None:
        while not stop.is_set():
            pids = descendants(proc.pid)
            total = sum(rss_bytes(pid) for pid in pids)
            peaks[current["round"]] = max(peaks[current["round"]], total)
            for pid in pids:
                if pid != proc.pid and pid not in seen:
                    try:
                        if not root_cmdline:
                            root_cmdline.append(Path(f"/proc/{proc.pid}/cmdline").read_bytes())
                        # A child between fork and exec is still a copy of the fedpriv process (its
                        # /proc environ is the parent's original block): judge it once it has exec'd.
                        if Path(f"/proc/{pid}/cmdline").read_bytes() == root_cmdline[0]:
                            continue
                        seen[pid] = key_text.encode() in Path(f"/proc/{pid}/environ").read_bytes()
                    except OSError:
                        pass  # (gone already)
            stop.wait(0.5)  # each sample walks /proc: often enough for a round of several seconds

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = ROUND_LINE.match(line)
        if match:
            current["round"] = int(match.group(1)) + 1
    stderr = proc.stderr.read()
    proc.wait(timeout=1200)
    stop.set()
    sampler.join()
    assert proc.returncode == 0, stderr[-3000:]
    # Nothing but fedpriv's own lines: no TensorFlow C++ log lines from its import or device set-up
    # ("I0000 00:00:... port.cc:..."), whichever library imports it first.
    assert not re.search(r"^[IWEF]\d{4} |absl::InitializeLog", stderr, re.M), stderr[-3000:]
    # Private by default: the run directory and the home (keys, node ledgers) are owner-only, and
    # so is what the run's processes left in the temporary directory (TensorFlow leaves its
    # autograph files there); Ray's private temporary directory (in place of a world-accessible
    # /tmp/ray) is gone.
    try:
        assert assert_private(out, tmp_path / "home") > CLIENTS
        assert_private(scratch)
        assert [p for p in scratch.iterdir() if p.name.startswith("fedpriv-ray-")] == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    assert len(seen) >= 3, seen  # Ray's processes and its worker(s)
    assert not any(seen.values()), {pid: found for pid, found in seen.items() if found}
    assert checkpoint.read_checkpoint(out / checkpoint.CHECKPOINT, key)[1]["round"] == ROUNDS

    summary = json.loads((out / "summary.json").read_text())
    # No lost update: every client trained and was aggregated in every round, no failure.
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["clients_trained"] == CLIENTS and r["clients_failed"] == 0 and r["failed"] is None
               for r in summary["rounds"]), summary["rounds"]
    assert summary["failures"] == []
    spends = [e for e in verify_ledger(out).entries if e["kind"] == "record_level"]
    assert len(spends) == CLIENTS * ROUNDS
    # No growth: the last round's peak against round 2's (round 1 starts the workers).
    assert all(peaks[r] > 0 for r in range(2, ROUNDS + 1)), dict(peaks)
    ratio = peaks[ROUNDS] / peaks[2]
    print(f"peak RSS per round (MiB): { {r: peaks[r] // 2**20 for r in sorted(peaks)} }; "
          f"round {ROUNDS} / round 2 = {ratio:.3f}")
    assert ratio <= GROWTH_LIMIT, dict(peaks)
