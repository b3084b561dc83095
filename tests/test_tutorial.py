"""The README's deployment walk-through, run as written: a real federation on loopback.

Real Flower processes: ``fedpriv server start`` runs flower-superlink with TLS and node
authentication, three ``fedpriv node join`` run flower-supernode with fedpriv's ClientApp,
``fedpriv server run`` trains 2 rounds under DP-SGD and SecAgg+, and ``fedpriv audit`` verifies
the ledger. The test then checks the run directory and every node's own ledger.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.clients.warm_start import COLD, READY
from fedpriv.common import checkpoint, keyfiles, stored_files
from fedpriv.common.ledger import load_public_key, verify_ledger
from fedpriv.common.review import verify_report
from tests.conftest import (ROOT, assert_listed, assert_private, files_containing, raw_byte_runs, reissue_expired,
                            run_cli_here, run_model)

pytestmark = pytest.mark.slow(cost=3)

HEADING = "## A real federation"


def walkthrough() -> str:
    """The first bash block under the deployment heading of README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(HEADING):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the deployment section has a bash block"
    return match.group(1)


def ports_in(script: str) -> set[int]:
    return {int(p) for p in re.findall(r"(?:--port |127\.0\.0\.1:)(\d+)", script)} | {9092, 9093}


def test_readme_walkthrough_runs_a_real_federation(tmp_path):
    script = walkthrough()
    for port in ports_in(script):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is busy; the walk-through needs it"
    home = tmp_path / "home"
    # a fresh shell: no fedpriv setting of this process (its checkpoint key, say) reaches the script
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDPRIV_")},
           "FEDPRIV_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "walkthrough.log"
    # under umask 022, the usual one: what fedpriv and the Flower processes it starts write must be
    # owner-only all the same
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=lambda: os.umask(0o022))
    try:
        code = proc.wait(timeout=1500)
    finally:  # the server and nodes it left in the background
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    output = log.read_text(errors="replace")
    assert code == 0, output[-5000:]
    assert "PASS" in output and "budgets held" in output, output[-3000:]
    assert "submitted by: alice (researcher)" in output, output[-3000:]  # from the operator log
    # every node's ClientApp tasks were forked from its warm zygote (clients/warm_start.py)
    assert output.count(READY) == 3 and COLD not in output, output[-3000:]
    # each node ledger's spends are matched with the run ledger's (same client ids), so a
    # rolled-back node ledger would show
    assert "the run ledger lacks" not in output and "names no client id" not in output, output[-3000:]
    # Private by default: keys, data shares, the server's state (SuperLink database, installed
    # apps, runs, operator log) and each node's state are owner-only.
    assert assert_private(tmp_path / "fed", home) > 50
    # Each node installed the app under its own Flower home, in its state, never in a shared
    # ~/.flwr where the three nodes would install the same app at the same moment.
    for i in (1, 2, 3):
        assert [p.name for p in (home / "nodes" / f"node-{i}" / "flwr" / "apps").iterdir()], i

    runs = list((tmp_path / "fed/server/runs").glob("federation-*"))
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["clients_failed"] == 0 for r in summary["rounds"])
    assert summary["secure_aggregation"]["enabled"] and summary["secure_aggregation"]["num_shares"] == 3
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    record = summary["privacy"]["record_level"]
    assert len(record["clients"]) == 3 and 0 < record["max_epsilon"] <= 8
    assert (run / "checkpoint.fpck").exists()  # sealed with the federation's checkpoint key
    # Sealed at rest: no file of the federation, the server's state or the nodes' holds the model's
    # weights or a node's training records in plaintext.
    # The keys are passphrase-protected (fedpriv keys --protect): OpenSSL reads them with the passphrase.
    passphrase = {keyfiles.PASSPHRASE_FILE_ENV: str(tmp_path / "fed/passphrase")}
    for name in ("ca.key", "superlink.key", "ledger-signing.key", "app-signing.key", "nodes/node-1",
                 "operators/alice.key"):
        assert keyfiles.is_protected((tmp_path / "fed/keys" / name).read_bytes()), name
    server_key = checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(tmp_path / "fed/keys/checkpoint.key"),
                                                  **passphrase})
    node_key = checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(home / "keys/checkpoint.key"), **passphrase})
    records = checkpoint.read_data(tmp_path / "fed/data/node-1.sealed", node_key)[0]
    needles = raw_byte_runs(run_model(run, server_key)) + raw_byte_runs([records])
    assert files_containing([tmp_path / "fed", home], needles) == []
    # Every file is in the README's table of stored files, sealed, signed or protected as it says.
    assert assert_listed(tmp_path / "fed/keys", stored_files.KEYS, protected_keys=True) >= 15
    assert assert_listed(tmp_path / "fed/data", stored_files.DATA) == 3
    assert assert_listed(tmp_path / "fed/server", stored_files.STATE) > 10
    assert assert_listed(home, stored_files.HOME, protected_keys=True) > 10  # (node.key made protected)

    ledger = verify_ledger(run)
    assert ledger.ok, ledger.failures
    assert ledger.entries[0]["parameters"]["config"]["federation.num_clients"] == 3
    spends = [e for e in ledger.entries if e["kind"] == "record_level"]
    assert len(spends) == 6  # 3 nodes x 2 rounds, each recorded once
    # The audit matched every node's ledger with the run's spends of that node (by node id).
    audit = run_cli_here("audit", str(run), "--json", "--public-key", str(tmp_path / "fed/keys/ledger-signing.pub"),
                         "--node-ledger", *(str(home / "nodes" / f"node-{n}") for n in (1, 2, 3)), env=env)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout[-3000:]
    assert ({n["client_id"] for n in report["node_ledgers"]} == {e["actor"].split(":", 1)[1] for e in spends}
            and all(n["spends"] == 2 for n in report["node_ledgers"])), report["node_ledgers"]
    # The ledger is signed with the federation's key from fedpriv keys.
    assert (run / "ledger.pub").read_bytes() == (tmp_path / "fed/keys/ledger-signing.pub").read_bytes()

    # The compliance review of the server's state (step 6) passed every control that applies to a
    # deployment, and its report verifies with the federation's key.
    assert "compliance review of server state" in output and "PASS (" in output, output[-3000:]
    reviews = list((tmp_path / "fed/server/reviews").glob("*/review.json"))
    assert len(reviews) == 1
    review = verify_report(reviews[0].read_bytes(), load_public_key(tmp_path / "fed/keys/ledger-signing.pub"))
    statuses = {c["id"]: c["status"] for c in review["controls"]}
    assert all(statuses[c] == "pass" for c in ("S-1", "S-2", "S-3", "S-4", "S-5", "S-6", "S-7", "T-2", "T-3", "T-4")), statuses
    s3 = next(c for c in review["controls"] if c["id"] == "S-3")
    assert "alice (researcher)" in s3["reason"]
    # The SuperLink's certificate, expired (re-issued by the same CA): S-7 fails, exit status 1.
    expired = tmp_path / "expired-keys"
    shutil.copytree(tmp_path / "fed/keys", expired)
    reissue_expired(expired, passphrase)
    failed = run_cli_here("review", str(tmp_path / "fed/server"), "--keys", str(expired), "--public-key",
                          str(tmp_path / "fed/keys/ledger-signing.pub"), "--out", str(tmp_path / "expired-review"),
                          env={**env, **passphrase})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert json.loads((tmp_path / "expired-review/review.json").read_text())["failed_controls"] == ["S-7"]
    assert "FAIL S-7: " in failed.stdout and "superlink.crt expired on" in failed.stdout

    for n in (1, 2, 3):  # each node kept its own signed spending ledger
        node = verify_ledger(home / "nodes" / f"node-{n}")
        assert node.ok, node.failures
        assert sum(e["kind"] == "record_level" for e in node.entries) == 2

    # The spending persists: joining again (here with a smaller budget) starts from it.
    spent = max(summary["privacy"]["record_level"]["clients"].values())
    join = ["node", "join", "--superlink", "127.0.0.1:9092", "--root-cert", "fed/keys/ca.crt", "--auth-key",
            "fed/keys/nodes/node-1", "--data", "fed/data/node-1.sealed", "--budget", "1", "--preset", "federation",
            "--dry-run"]
    again = subprocess.run(["fedpriv", *join], cwd=tmp_path, env={**env, **passphrase}, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"spent so far {spent:.3f}" in again.stdout and "will refuse to train" in again.stdout, again.stdout

    # A wrong passphrase, or none, for the node's protected key: one error line, nothing started.
    (tmp_path / "wrong").write_text("not the passphrase\n")
    for extra, message in (({keyfiles.PASSPHRASE_FILE_ENV: str(tmp_path / "wrong")}, "wrong passphrase"),
                           ({}, "is passphrase-protected")):
        refused = run_cli_here(*join, cwd=tmp_path, env={**env, **extra})
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
