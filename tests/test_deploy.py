"""Real federations: fedpriv server start / node join refuse what they must, with one clear line.

The fast tests check bad input before anything starts (in this process: ``cli_here``; the
fresh-interpreter checks of the error line are in tests/test_cli.py, and the unreachable-SuperLink
case below runs in one). The slow ones start a real SuperLink
with TLS and node authentication on loopback (``fedpriv server start``) and try to join it with
an unregistered key, the wrong CA and in plaintext; each is refused, and the test says where.
The full training run over TLS is tests/test_tutorial.py (it runs the README's walk-through).
"""

from __future__ import annotations

import datetime
import http.client
import os
import ssl
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedpriv.common.tls import DeploymentError, load_certificate
from fedpriv.server.gateway import allowed
from fedpriv.common.ledger import verify_ledger
from tests.conftest import ROOT, free_port, free_port_pair, run_cli_here

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_deploy")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command failed with exit 2 and exactly one ``error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def expired_certificate(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Federation keys for 3 nodes, a foreign federation's keys, and node data files."""
    root = tmp_path_factory.mktemp("federation")
    for args in (["keys", "--out", str(root / "keys"), "--nodes", "3"],
                 ["keys", "--out", str(root / "other"), "--nodes", "1"],
                 ["split-data", "--out", str(root / "data"), "--nodes", "3"]):
        proc = run_cli_here(*args)
        assert proc.returncode == 0, proc.stderr
    return root


def join_args(material: Path, port: int, *extra: str, node: str = "node-1") -> list[str]:
    return ["node", "join", "--superlink", f"127.0.0.1:{port}", "--root-cert", str(material / "keys/ca.crt"),
            "--auth-key", str(material / "keys/nodes" / node), "--data", str(material / f"data/{node}.npz"),
            "--state", str(material / "node-state"), "--port", str(free_port()), *extra]


# ---- bad input, before anything starts ----------------------------------------------------------
def test_certificates_that_expired_or_are_not_certificates_are_refused(tmp_path):
    expired_certificate(tmp_path / "old.crt")
    with pytest.raises(DeploymentError, match="expired on"):
        load_certificate(tmp_path / "old.crt", "root certificate")
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(DeploymentError, match="not a PEM certificate"):
        load_certificate(tmp_path / "junk.crt", "root certificate")
    with pytest.raises(DeploymentError, match="does not exist"):
        load_certificate(tmp_path / "missing.crt", "root certificate")
    with pytest.raises(DeploymentError, match="is a directory"):
        load_certificate(tmp_path, "root certificate")


def test_node_join_refuses_bad_input_with_one_line(cli_here, material, tmp_path):
    port = free_port()
    expired_certificate(tmp_path / "old.crt")
    bad = {
        "expired on": ["--root-cert", str(tmp_path / "old.crt")],
        "node key": ["--auth-key", str(material / "keys/ca.crt")],
        "does not exist": ["--auth-key", str(tmp_path / "no-such-key")],
    }
    for expected, override in bad.items():
        args = join_args(material, port)
        i = args.index(override[0])
        args[i + 1] = override[1]
        line = one_error_line(cli_here(*args, "--dry-run"))
        assert expected in line, line
    np.savez(tmp_path / "small.npz", x=np.zeros((20, 8, 8), np.float32), y=np.zeros(20, np.int64))
    args = join_args(material, port)
    args[args.index("--data") + 1] = str(tmp_path / "small.npz")
    line = one_error_line(cli_here(*args, "--dry-run"))
    assert "shape (8, 8, 1)" in line and "(28, 28, 1)" in line, line
    line = one_error_line(cli_here("node", "join", "--superlink", "127.0.0.1:1", "--data",
                              str(material / "data/node-1.npz")))
    assert "--root-cert and --auth-key are required" in line and "--insecure" in line


def test_nodes_trust_an_app_signing_key_and_runs_are_signed(cli_here, material, tmp_path):
    """A node runs only apps signed by a key it trusts (the gate: tests/test_appsign.py,
    tests/test_app_gate_e2e.py); without one it does not start. fedpriv server run signs."""
    lone = tmp_path / "ca-only"
    lone.mkdir()
    (lone / "ca.crt").write_bytes((material / "keys/ca.crt").read_bytes())
    args = join_args(material, free_port())
    args[args.index("--root-cert") + 1] = str(lone / "ca.crt")
    line = one_error_line(cli_here(*args, "--dry-run"))
    assert "no trusted app-signing key" in line and "--trust" in line, line
    line = one_error_line(cli_here(*args, "--trust", str(material / "keys/nodes/node-1.pub"), "--dry-run"))
    assert "Ed25519" in line, line
    proc = cli_here(*args, "--trust", str(material / "keys/app-signing.pub"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--isolation process" in proc.stdout and "fedpriv.clients.app_gate superexec" in proc.stdout
    assert "runs only apps signed by app-signing key" in proc.stdout
    # the default: app-signing.pub beside --root-cert
    proc = cli_here(*join_args(material, free_port()), "--dry-run")
    assert proc.returncode == 0 and f"FEDPRIV_APP_TRUST={material / 'keys/app-signing.pub'} " in proc.stdout
    # --insecure without a trusted key: Flower's own SuperExec, and a warning that any app runs
    proc = cli_here("node", "join", "--superlink", "127.0.0.1:1", "--data", str(material / "data/node-1.npz"),
               "--insecure", "--dry-run")
    assert proc.returncode == 0 and "runs ANY app" in proc.stdout and "--isolation" not in proc.stdout
    # fedpriv server run signs with app-signing.key beside --root-cert, or refuses in one line
    run = ["server", "run", "--superlink", "127.0.0.1:1", "--root-cert", str(lone / "ca.crt"), "--dry-run"]
    line = one_error_line(cli_here(*run))
    assert "no app-signing key" in line and "--app-key" in line, line
    proc = cli_here(*run, "--app-key", str(material / "keys/app-signing.key"))
    assert proc.returncode == 0 and 'run.app_signature="ed25519:' in proc.stdout, proc.stderr


def test_node_join_gives_up_on_an_unreachable_superlink_after_bounded_retries(cli, material):
    state = material / "node-state" / "node-1"
    def files() -> dict[str, bytes]:  # (the node's Flower home, once another test joined, holds folders)
        return {str(p.relative_to(state)): p.read_bytes() for p in state.rglob("*") if p.is_file()}

    before = files() if state.exists() else {}
    started = time.monotonic()
    line = one_error_line(cli(*join_args(material, free_port(), "--max-retries", "2")))
    assert "cannot reach the SuperLink" in line and "after 3 attempts" in line, line
    assert time.monotonic() - started < 60
    after = files() if state.exists() else {}
    assert after == before  # nothing the node had recorded is touched


def test_server_start_checks_its_key_material(cli_here, material, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca.crt", "superlink.crt", "ledger-signing.key"):
        (keys / name).write_bytes((material / "keys" / name).read_bytes())
    (keys / "nodes").mkdir()
    (keys / "nodes/node-1.pub").write_bytes((material / "keys/nodes/node-1.pub").read_bytes())
    base = ["server", "start", "--keys", str(keys), "--state", str(tmp_path / "state"), "--dry-run"]
    assert "SuperLink key" in one_error_line(cli_here(*base)) and "does not exist" in one_error_line(cli_here(*base))
    (keys / "superlink.key").write_bytes((material / "other/superlink.key").read_bytes())
    assert "does not belong to the certificate" in one_error_line(cli_here(*base))
    (keys / "superlink.key").write_bytes((material / "keys/superlink.key").read_bytes())
    (keys / "ca.crt").write_bytes((material / "other/ca.crt").read_bytes())
    assert "not signed by the federation CA" in one_error_line(cli_here(*base))
    (keys / "ca.crt").write_bytes((material / "keys/ca.crt").read_bytes())
    (keys / "nodes/node-1.pub").write_text("ssh-ed25519 AAAA nonsense")
    assert "not an OpenSSH public key" in one_error_line(cli_here(*base))
    (keys / "nodes/node-1.pub").write_bytes((material / "keys/nodes/node-1.pub").read_bytes())
    line = one_error_line(cli_here(*base))
    assert "node roster" in line and "roster.signed" in line  # none yet
    (keys / "roster.signed").write_bytes((material / "other/roster.signed").read_bytes())
    assert "does not verify against this node's trust anchor" in one_error_line(cli_here(*base))
    from fedpriv.common.roster import sign_roster
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca_key = load_pem_private_key((material / "keys/ca.key").read_bytes(), None)
    (keys / "roster.signed").write_bytes(sign_roster(ca_key, []))  # the CA's, without node-1
    assert "is not on the roster" in one_error_line(cli_here(*base))
    (keys / "roster.signed").write_bytes((material / "keys/roster.signed").read_bytes())
    proc = cli_here(*base)
    assert proc.returncode == 0, proc.stderr
    assert "--enable-supernode-auth" in proc.stdout and "--ssl-certfile" in proc.stdout
    assert "--disable-runtime-dependency-installation" in proc.stdout and "--database" in proc.stdout
    assert not (tmp_path / "state").exists()  # a dry run writes nothing


# ---- a real SuperLink on loopback -----------------------------------------------------------
class SuperLink:
    def __init__(self, material: Path, state: Path, port: int, log: Path) -> None:
        self.port, self.log = port, log
        args = ["server", "start", "--keys", str(material / "keys"), "--state", str(state),
                "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen([sys.executable, "-m", "fedpriv", *args], cwd=ROOT,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        deadline = time.monotonic() + 120
        while "SuperLink ready" not in self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)



@pytest.fixture(scope="module")
def superlink(material, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    link = SuperLink(material, material / "server-state", free_port_pair(), logs / "superlink.log")
    yield link
    if link.proc.poll() is None:
        link.stop()


@pytest.mark.slow
def test_an_unregistered_node_key_is_refused(cli, material, superlink):
    args = join_args(material, superlink.port, "--max-retries", "1")
    args[args.index("--auth-key") + 1] = str(material / "other/nodes/node-1")  # not registered here
    proc = cli(*args)
    line = one_error_line(proc)
    assert "refused this node" in line and "not registered" in line, line
    assert proc.stderr.count("trying again") == 1  # bounded: --max-retries 1 means two attempts
    # The refusal is the SuperLink's: it found no registered node with this key.
    assert "No SuperNode found with the given public key" in superlink.output()


@pytest.mark.slow
def test_a_node_with_the_wrong_ca_is_refused(cli, material, superlink):
    args = join_args(material, superlink.port)
    args[args.index("--root-cert") + 1] = str(material / "other/ca.crt")
    line = one_error_line(cli(*args))
    assert "failed TLS verification" in line, line
    # Flower's own SuperNode refuses the same certificate, with fedpriv's checks out of the way.
    log = material / "wrong-ca-supernode.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", f"127.0.0.1:{superlink.port}",
         "--root-certificates", str(material / "other/ca.crt"),
         "--auth-supernode-private-key", str(material / "keys/nodes/node-1"),
         "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        code = proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its SuperExec helper
        except ProcessLookupError:
            pass
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in log.read_text()


@pytest.mark.slow
def test_plaintext_connections_to_the_tls_port_are_refused(cli, material, superlink):
    proc = cli(*join_args(material, superlink.port, "--insecure", "--max-retries", "1", "--max-wait", "10"))
    assert "WITHOUT TLS" in proc.stderr  # the loud warning
    line = one_error_line(proc)
    assert "lost the SuperLink" in line or "exited with code" in line, line
    # A plaintext HTTP request gets no HTTP answer: the port only speaks TLS.
    with socket.create_connection(("127.0.0.1", superlink.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer[:100]


def test_the_gateway_lets_only_the_fleet_api_through():
    assert allowed("POST", "/v1/fleet/pull-messages") and allowed("GET", "/health")
    for method, path in [("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"),
                         ("POST", "/v1/runtime/pull-messages"), ("GET", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/fleet/../control/register-node"), ("POST", "/v1/fleet%2F..%2Fcontrol"),
                         ("GET", "/docs"), ("POST", "/v1/fleetx")]:
        assert not allowed(method, path), (method, path)


def https(port: int, ca: Path, method: str, path: str, client: tuple[Path, Path] | None = None) -> int:
    """The HTTP status of one request over verified TLS (presenting ``client``, a certificate and
    key, if given)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"content-type": "application/protobuf"} if method == "POST" else {})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.slow
def test_the_nodes_port_refuses_registration_and_runs(material, superlink, tmp_path):
    ca = material / "keys/ca.crt"
    assert https(superlink.port, ca, "GET", "/health") == 200
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs",
                 "/v1/runtime/pull-messages"):
        assert https(superlink.port, ca, "POST", path) == 403, path
    # Flower's own CLI, pointed at the nodes' port, cannot register a key there...
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "127.0.0.1:{superlink.port}"\n'
        f'root-certificates = "{ca}"\n')
    env = {**os.environ, "FLWR_HOME": str(home)}
    flwr = str(Path(sys.executable).parent / "flwr")
    proc = subprocess.run([flwr, "supernode", "register", str(material / "other/nodes/node-1.pub"), "x"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    # The operators' port asks for an operator certificate: without one the TLS handshake fails...
    admin = superlink.port + 1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(admin, ca, "POST", "/v1/control/list-runs")
    # ...and with an admin's, the SuperLink behind it answers.
    keys = material / "keys"
    for role in ("admin", "auditor"):
        if not (keys / "operators" / f"{role}-op.crt").exists():
            assert run_cli_here("keys", "--out", str(keys), "--operator", f"{role}-op", "--role", role).returncode == 0
    def operator(role: str) -> tuple[Path, Path]:
        return keys / f"operators/{role}-op.crt", keys / f"operators/{role}-op.key"

    assert https(admin, ca, "POST", "/v1/control/list-nodes", operator("admin")) == 200
    # An auditor may not register a node there; the attempt is in the signed operator log.
    assert https(admin, ca, "POST", "/v1/control/register-node", operator("auditor")) == 403
    log = verify_ledger(material / "server-state" / "operator-log")
    assert log.ok and [(e["actor"], e["parameters"]["action"], e["parameters"]["allowed"]) for e in log.entries][-2:] \
        == [("operator:admin-op", "list-nodes", True), ("operator:auditor-op", "register-node", False)]
    # Flower's own CLI through fedpriv operator connect: an admin lists the nodes and the runs, an
    # auditor cannot register a node.
    from fedpriv.operator_cmd import start_forwarder

    for role, command, ok in (("admin", ["supernode", "list", "x", "--format", "json"], True),
                              ("admin", ["ls", "x", "--format", "json"], True),
                              ("auditor", ["supernode", "register", str(material / "other/nodes/node-1.pub"), "x"],
                               False)):
        forwarder = start_forwarder(f"127.0.0.1:{admin}", ca, keys / f"operators/{role}-op.crt",
                                    keys / f"operators/{role}-op.key", 0)
        try:
            (home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n[superlink.x]\n'
                                              f'address = "127.0.0.1:{forwarder.port}"\ninsecure = true\n')
            proc = subprocess.run([flwr, *command], env=env, capture_output=True, text=True, timeout=120)
        finally:
            forwarder.stop()
        assert (proc.returncode == 0) == ok, (command, proc.stdout[-1500:], proc.stderr[-1500:])
        if command[:2] == ["supernode", "list"]:
            assert proc.stdout.count('"node-id"') >= 3, proc.stdout[-1500:]


@pytest.mark.slow
def test_restarted_superlink_keeps_its_registrations(material, superlink, tmp_path):
    assert superlink.stop() == 0
    # New ports: the registrations live in the state, and the old ports may have been taken by
    # another process (a parallel test worker) since the first SuperLink let go of them.
    again = SuperLink(material, material / "server-state", free_port_pair(), tmp_path / "again.log")
    try:
        assert again.output().count("already registered") == 3, again.output()[-2000:]
        # Revoking a node key takes effect without a restart: node-3 can no longer join.
        proc = subprocess.run([sys.executable, "-m", "fedpriv", "server", "revoke", "--state",
                               str(material / "server-state"), "--node", str(material / "keys/nodes/node-3.pub")],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "unregistered node" in proc.stdout, proc.stderr
        proc = subprocess.run([sys.executable, "-m", "fedpriv", *join_args(material, again.port, "--max-retries", "0",
                                                                            node="node-3")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode != 0 and "not registered" in proc.stderr, proc.stderr[-2000:]
    finally:
        assert again.stop() == 0
