"""A foreign Flower app, submitted with plain ``flwr run``, never runs on a fedpriv node.

Real processes on loopback: ``fedpriv server start`` (TLS, node authentication) and one
``fedpriv node join`` with its data file. A foreign app is submitted with Flower's own
``flwr run``: its ClientApp reads the node's data file and sends the bytes back, its ServerApp
writes every reply it receives to a file. Unsigned, signed by a key the node does not trust, and
signed by the federation's key but altered afterwards, it is refused by the node before any of
its code is installed: the server receives only the node's error replies, never the file's
bytes, and each refusal is in the node's own ledger. The control case, the same app signed with
the federation's key, shows that the channel the test watches does carry the file when the
node runs the app. fedpriv's own signed app runs in tests/test_tutorial.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedpriv.common.appsign import APP_REFUSED_CODE, SIGNATURE_SETTING
from fedpriv.common.ledger import verify_ledger
from tests.conftest import ROOT, free_port, free_port_pair, run_cli_here
from tests.foreign_app import FOREIGN_CLIENT, write_foreign_app
from tests.test_deploy import SuperLink

pytestmark = pytest.mark.slow(cost=2)
MODULE = "foreignapp_e2e"

SERVER_APP = '''
import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes, deadline = [], time.time() + 90
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train", group_id="1") for n in nodes]
    seen = []
    for reply in grid.send_and_receive(messages, timeout=120):
        if reply.has_error():
            seen.append({"error": reply.error.code, "reason": reply.error.reason})
        else:
            seen.append({"content": {name: {k: v.hex() if isinstance(v, bytes) else repr(v) for k, v in rec.items()}
                                     for name, rec in reply.content.config_records.items()}})
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": len(nodes), "replies": seen}))
'''

def fedpriv(*args: str, cwd: Path) -> str:
    """``fedpriv keys`` and ``fedpriv app sign`` (no federation starts: in this process)."""
    proc = run_cli_here(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_foreign_apps_are_refused_by_the_node_before_they_run(tmp_path):
    for args in (["keys", "--out", "keys", "--nodes", "1"], ["keys", "--out", "other", "--nodes", "1"]):
        fedpriv(*args, cwd=tmp_path)
    rng = np.random.default_rng(1)
    data = tmp_path / "node-1.npz"  # a small data file the federation's model accepts
    np.savez(data, x=rng.random((40, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 40))
    secret = data.read_bytes()
    app = tmp_path / "foreign"
    write_foreign_app(app, MODULE, SERVER_APP, {"out": ""})

    port = free_port_pair()
    link = SuperLink(tmp_path, tmp_path / "server", port, tmp_path / "superlink.log")
    node_log = tmp_path / "node.log"
    node = subprocess.Popen(
        [sys.executable, "-m", "fedpriv", "node", "join", "--superlink", f"127.0.0.1:{port}",
         "--root-cert", str(tmp_path / "keys/ca.crt"), "--auth-key", str(tmp_path / "keys/nodes/node-1"),
         "--data", str(data), "--state", str(tmp_path / "node-state"), "--port", str(free_port())],
        cwd=ROOT, stdout=node_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "server/flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = str(Path(sys.executable).parent / "flwr")

    def submit(case: str, signature: str | None) -> dict:
        out = tmp_path / f"{case}.json"
        settings = f'out="{out}"' + (f' {SIGNATURE_SETTING}="{signature}"' if signature is not None else "")
        started = time.monotonic()
        proc = subprocess.run([flwr, "run", str(app), "fedpriv", "--run-config", settings, "--stream"],
                              env=env, capture_output=True, text=True, timeout=400)
        assert out.exists(), (case, proc.stdout[-3000:], proc.stderr[-2000:], node_log.read_text()[-3000:])
        print(f"{case}: {time.monotonic() - started:.0f} s")
        return json.loads(out.read_text())

    def sign(key_dir: str) -> str:
        line = fedpriv("app", "sign", "--key", str(tmp_path / key_dir / "app-signing.key"), str(app), cwd=tmp_path)
        assert line.startswith(f'{SIGNATURE_SETTING}="')
        return line.strip().split("=", 1)[1].strip('"')

    try:
        results = {"unsigned": submit("unsigned", None), "untrusted": submit("untrusted", sign("other"))}
        signature = sign("keys")
        client = app / MODULE / "client.py"
        client.write_text(client.read_text() + "\n# altered after signing\n")
        results["altered"] = submit("altered", signature)
        client.write_text(FOREIGN_CLIENT)  # as signed
        control = submit("signed", signature)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        link.stop()
    log = node_log.read_text(errors="replace")

    expected = {"unsigned": "is not signed", "untrusted": "does not trust", "altered": "was altered"}
    for case, result in results.items():
        assert result["nodes"] == 1 and len(result["replies"]) == 1, (case, result)
        (reply,) = result["replies"]
        assert reply.get("error") == APP_REFUSED_CODE and expected[case] in reply["reason"], (case, reply)
        assert secret.hex() not in json.dumps(result)  # the file's bytes never reached the server
        assert expected[case] in log  # the refusal is in the node's own output
    # The control: signed by the federation's key, the app runs and the file does come back.
    (reply,) = control["replies"]
    assert reply["content"]["stolen"]["data"] == secret.hex()
    assert "none of its code was installed" in log

    ledger = verify_ledger(tmp_path / "node-state/node-1")
    assert ledger.ok, ledger.failures
    notes = [e["note"] for e in ledger.entries if e["kind"] == "app_refusal"]
    assert len(notes) == 3 and all(any(expected[c] in n for n in notes) for c in expected), notes
