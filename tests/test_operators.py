"""The operators' port: mutual TLS with CA-issued operator certificates, roles, revocation without
a restart, and a signed log of every attempt.

The gateway under test is real (TLS, certificate checks, forwarding); the SuperLink behind it is
a small HTTPS stand-in that answers every forwarded Control API call, so the tests can see what
got through.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.proto.control_pb2 import StartRunResponse, StopRunRequest

from fedpriv.common.keys import federation_keys, write_keys
from fedpriv.common.ledger import LEDGER, verify_ledger
from fedpriv.common.operators import issue_operator
from fedpriv.server.operators import OPERATOR_LOG, OperatorGateway, revoke_operator

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_operators")


class _FakeSuperLink(BaseHTTPRequestHandler):
    calls: list[str] = []
    next_run = 41

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).calls.append(self.path)
        body = b""
        if self.path == "/v1/control/start-run":
            type(self).next_run += 1
            body = StartRunResponse(run_id=type(self).next_run).SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.flush()  # the head and the body in separate TLS records, as uvicorn sends them
        time.sleep(0.05)
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("operators")
    keys, other = root / "keys", root / "other"
    write_keys(federation_keys(keys, ["localhost"], 0, 1), force=False)
    write_keys(federation_keys(other, ["localhost"], 0, 1), force=False)
    certs = {}
    for name, role, ca in [("ada", "admin", keys), ("rita", "researcher", keys), ("rob", "researcher", keys),
                           ("aud", "auditor", keys), ("eve", "admin", other), ("rex", "researcher", keys)]:
        key_pem, cert_pem = issue_operator((ca / "ca.crt").read_bytes(), (ca / "ca.key").read_bytes(), name, role)
        (root / f"{name}.key").write_bytes(key_pem)
        (root / f"{name}.crt").write_bytes(cert_pem)
        certs[name] = (root / f"{name}.crt", root / f"{name}.key")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSuperLink)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(keys / "superlink.crt"), str(keys / "superlink.key"))
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    state = root / "state"
    gateway = OperatorGateway("127.0.0.1", 0, keys / "superlink.crt", keys / "superlink.key", "127.0.0.1",
                              upstream.server_address[1], keys / "ca.crt", state, Ed25519PrivateKey.generate())
    gateway.start()
    yield {"keys": keys, "certs": certs, "gateway": gateway, "state": state}
    gateway.stop()
    upstream.shutdown()


def call(federation, who: str | None, action: str, body: bytes = b"") -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(federation["keys"] / "ca.crt"))
    if who is not None:
        cert, key = federation["certs"][who]
        context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", federation["gateway"].port, timeout=30, context=context)
    try:
        conn.request("POST", f"/v1/control/{action}", body=body,
                     headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode("latin-1")
    except (ssl.SSLError, ConnectionError):
        return 0, "TLS refused"
    finally:
        conn.close()


def _log(federation, at_least: int = 0):
    """The operator log's entries once it holds ``at_least`` (a refused handshake is logged by the
    gateway's thread after the client has already seen the failure)."""
    if at_least == 0 and not (federation["state"] / OPERATOR_LOG / LEDGER).exists():
        return []  # nothing logged yet: this test runs first on its worker
    deadline = time.monotonic() + 10
    while True:
        report = verify_ledger(federation["state"] / OPERATOR_LOG)
        if (report.ok and len(report.entries) >= at_least) or time.monotonic() > deadline:
            assert report.ok, report.failures
            return report.entries
        time.sleep(0.05)


def test_roles_allow_only_their_calls_and_every_attempt_is_logged(federation):
    before = len(_FakeSuperLink.calls)
    assert call(federation, "aud", "start-run")[0] == 403  # an auditor submitting a run
    status, text = call(federation, "rita", "register-node")  # a researcher registering a node
    assert status == 403 and "role researcher may not" in text
    assert call(federation, "aud", "list-runs")[0] == 200
    assert call(federation, "ada", "register-node")[0] == 200
    assert _FakeSuperLink.calls[before:] == ["/v1/control/list-runs", "/v1/control/register-node"]
    entries = [e for e in _log(federation) if e["parameters"]["action"] in ("start-run", "register-node", "list-runs")]
    assert [(e["actor"], e["parameters"]["action"], e["parameters"]["allowed"]) for e in entries[-4:]] == [
        ("operator:aud", "start-run", False), ("operator:rita", "register-node", False),
        ("operator:aud", "list-runs", True), ("operator:ada", "register-node", True)]


def test_a_researcher_follows_and_stops_only_its_own_runs(federation):
    assert call(federation, "rita", "start-run")[0] == 200
    (started,) = [e for e in _log(federation) if e["parameters"]["action"] == "start-run"
                  and e["parameters"]["allowed"] and e["actor"] == "operator:rita"][-1:]
    run = int(started["parameters"]["run_id"])
    own = StopRunRequest(run_id=run).SerializeToString()
    assert call(federation, "rita", "stream-logs", own)[0] == 200
    status, text = call(federation, "rob", "stop-run", own)
    assert status == 403 and "only runs it submitted" in text
    assert call(federation, "ada", "stop-run", own)[0] == 200  # an admin stops any run
    assert call(federation, "rita", "stop-run", own)[0] == 200


@pytest.mark.parametrize("who", [None, "eve"])
def test_no_certificate_or_one_from_another_ca_is_refused_and_logged(federation, who):
    before = len(_log(federation))
    status, _ = call(federation, who, "list-runs")
    assert status == 0  # the TLS handshake fails: nothing reaches the SuperLink
    new = _log(federation, before + 1)[before:]
    assert [(e["actor"], e["parameters"]["action"], e["parameters"]["allowed"]) for e in new] == [
        ("operator:unknown", "connect", False)]
    assert "no valid operator certificate" in new[0]["note"]


def test_a_revoked_certificate_is_refused_without_a_restart(federation):
    assert call(federation, "rex", "list-runs")[0] == 200
    who = revoke_operator(federation["state"], federation["certs"]["rex"][0])
    assert who.name == "rex" and who.role == "researcher"
    status, text = call(federation, "rex", "list-runs")
    assert status == 403 and "revoked" in text
    assert _log(federation)[-1]["note"] == "certificate revoked"
    assert call(federation, "rita", "list-runs")[0] == 200  # others are unaffected


def test_operator_names_and_roles_are_checked_when_issued(federation):
    from fedpriv.common.errors import FedprivError

    ca = federation["keys"]
    for name, role in [("bad name", "admin"), ("ok", "root")]:
        with pytest.raises(FedprivError):
            issue_operator((ca / "ca.crt").read_bytes(), (ca / "ca.key").read_bytes(), name, role)


def test_a_malformed_request_head_is_a_400(federation):
    import socket

    context = ssl.create_default_context(cafile=str(federation["keys"] / "ca.crt"))
    context.load_cert_chain(*(str(p) for p in federation["certs"]["ada"]))
    for head in (b"POST /v1/control/list-runs HTTP/1.1\r\ncontent-length: x\r\n\r\n",
                 b"POST /v1/control/list-runs HTTP/1.1\r\nhost: a\r\n folded\r\n\r\n",
                 b"POST /v1/control/list-runs HTTP/1.1\nhost: a\r\n\r\n",
                 b"POST /v1/control/list-runs HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", federation["gateway"].port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(head)
                assert tls.recv(4096).startswith(b"HTTP/1.1 400"), head



def test_flwr_reaches_the_operators_port_through_fedpriv_operator_connect(federation):
    """The local forwarder carries the operator's certificate: a plain loopback request gets the
    operator's rights, and the log names the operator."""
    from fedpriv.operator_cmd import start_forwarder

    cert, key = federation["certs"]["rita"]
    forwarder = start_forwarder(f"127.0.0.1:{federation['gateway'].port}", federation["keys"] / "ca.crt",
                                cert, key, 0)
    try:
        for action, expected in (("list-runs", 200), ("register-node", 403)):
            conn = http.client.HTTPConnection("127.0.0.1", forwarder.port, timeout=30)
            conn.request("POST", f"/v1/control/{action}", body=b"", headers={"content-type": "application/protobuf"})
            assert conn.getresponse().status == expected, action
            conn.close()
    finally:
        forwarder.stop()
    assert [(e["actor"], e["parameters"]["action"]) for e in _log(federation)[-2:]] == [
        ("operator:rita", "list-runs"), ("operator:rita", "register-node")]


def test_operator_connect_refuses_bad_input_in_one_line(federation, tmp_path):
    from fedpriv.common.errors import FedprivError
    from fedpriv.operator_cmd import start_forwarder

    cert, key = federation["certs"]["rita"]
    garbage = tmp_path / "not-a-cert.pem"
    garbage.write_text("hello")
    for args in (("no-port", federation["keys"] / "ca.crt", cert, key),
                 ("127.0.0.1:1", garbage, cert, key),
                 ("127.0.0.1:1", federation["keys"] / "ca.crt", cert, garbage)):
        with pytest.raises(FedprivError) as err:
            start_forwarder(*args, 0)
        assert "\n" not in str(err.value)


def test_fedpriv_keys_issues_operator_certificates_the_gateway_accepts(tmp_path, capsys):
    from cryptography import x509

    from fedpriv.common.operators import operator_of
    from fedpriv.cli import main

    assert main(["keys", "--out", str(tmp_path), "--nodes", "0"]) == 0
    assert main(["keys", "--out", str(tmp_path), "--operator", "olga", "--role", "auditor"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "operators" / "olga.crt").read_bytes())
    assert operator_of(cert).name == "olga" and operator_of(cert).role == "auditor"
    assert (tmp_path / "operators" / "olga.key").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    assert main(["keys", "--out", str(tmp_path), "--operator", "olga", "--role", "auditor"]) != 0  # no overwrite
    assert main(["keys", "--out", str(tmp_path), "--operator", "olga"]) != 0
    assert main(["keys", "--out", str(tmp_path / "none"), "--operator", "x", "--role", "admin"]) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)


def test_the_audit_says_who_submitted_a_run_and_fails_on_a_forged_operator_log(federation, tmp_path):
    """The run's ledger records its Flower run id; the audit finds the submitter in the server's
    verified operator log (STATE/operator-log beside STATE/runs), and fails when that log is altered."""
    import json as _json

    from fedpriv.common.audit import audit_run
    from fedpriv.common.config import load_config
    from fedpriv.server.privacy import PrivacyRecorder

    assert call(federation, "rita", "start-run")[0] == 200
    run = max(federation["gateway"].log.submitted_runs())
    run_dir = federation["state"] / "runs" / "r1"
    PrivacyRecorder(load_config(overrides=["dp.noise_multiplier=1.1"]), run_dir, flower_run_id=run)
    report = audit_run(run_dir)
    assert report["submitted_by"] == [{"flower_run_id": str(run), "operator": "rita", "role": "researcher"}]
    # Someone rewrites the log to blame another operator: the chain no longer verifies.
    log = federation["state"] / OPERATOR_LOG / "ledger.jsonl"
    original = log.read_text()
    lines = original.splitlines()
    forged = [line.replace('"operator:rita"', '"operator:rob"') if f'"run_id":"{run}"' in line else line
              for line in lines]
    assert forged != lines
    log.write_text("\n".join(forged) + "\n")
    try:
        report = audit_run(run_dir)
        assert not report["ok"] and any("operator log" in f for f in report["failures"])
    finally:
        log.write_text(original)
    assert _json.loads(lines[0])["kind"] == "operator_action"


def test_server_run_and_revoke_refuse_bad_input_in_one_line(federation, tmp_path, capsys):
    from fedpriv.cli import main

    state = tmp_path / "state"
    state.mkdir()
    cases = [
        ["server", "run", "--state", str(state), "--preset", "federation"],  # no operator certificate
        ["server", "revoke", "--state", str(state)],  # nothing to revoke
        ["server", "revoke", "--state", str(tmp_path / "none"), "--operator-cert", str(federation["certs"]["rob"][0])],
        ["server", "revoke", "--state", str(state), "--operator-cert", str(tmp_path / "missing.crt")],
    ]
    for args in cases:
        capsys.readouterr()
        assert main(args) != 0, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (args, err)
    assert main(["server", "revoke", "--state", str(state), "--operator-cert", str(federation["certs"]["rob"][0])]) == 0
    assert "revoked rob (researcher" in capsys.readouterr().out
