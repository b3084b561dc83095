"""`fedpriv keys`: the federation's CA, TLS, node-authentication and ledger keys."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedpriv.common.ledger import load_or_create_signing_key, load_public_key
from tests.conftest import free_port

PRIVATE = ["ca.key", "superlink.key", "nodes/node-1", "nodes/node-2", "ledger-signing.key", "checkpoint.key"]
PUBLIC = ["ca.crt", "superlink.crt", "nodes/node-1.pub", "nodes/node-2.pub", "ledger-signing.pub", "roster.signed"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_keys_are_complete_valid_and_private(cli_here, tmp_path):
    out = tmp_path / "keys"
    proc = cli_here("keys", "--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3")
    assert proc.returncode == 0, proc.stderr
    for name in PRIVATE:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    for name in PUBLIC:  # not secret, but handed over on purpose, never shared by file mode
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    link = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    link.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    # Node keys are in the format Flower's SuperNode and `flwr supernode register` read.
    from flwr.cli.supernode.register import try_load_public_key

    for node in ("node-1", "node-2"):
        private = load_ssh_private_key((out / "nodes" / node).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(out / "nodes" / f"{node}.pub")
    assert (out / "nodes/node-1.pub").read_bytes() != (out / "nodes/node-2.pub").read_bytes()
    ledger_key = load_or_create_signing_key(out / "ledger-signing.key")
    assert ledger_key.public_key() == load_public_key(out / "ledger-signing.pub")
    # The roster names exactly the node keys, signed by the CA.
    from fedpriv.common.roster import load_trust_anchor, open_roster

    roster = open_roster((out / "roster.signed").read_bytes(), load_trust_anchor(out / "ca.crt"))
    assert roster.nodes == {" ".join((out / "nodes" / f"{n}.pub").read_text().split()[:2])
                            for n in ("node-1", "node-2")}


def test_the_roster_is_re_signed_with_a_new_node_key(cli_here, tmp_path):
    from fedpriv.common.roster import load_trust_anchor, open_roster

    out, other = tmp_path / "keys", tmp_path / "other"
    assert cli_here("keys", "--out", str(out), "--nodes", "1").returncode == 0
    assert cli_here("keys", "--out", str(other), "--nodes", "1").returncode == 0
    newcomer = other / "nodes" / "node-1.pub"
    proc = cli_here("keys", "--out", str(out), "--sign-roster", "--node-key", str(newcomer))
    assert proc.returncode == 0, proc.stderr
    roster = open_roster((out / "roster.signed").read_bytes(), load_trust_anchor(out / "ca.crt"))
    assert " ".join(newcomer.read_text().split()[:2]) in roster and len(roster.nodes) == 2
    (tmp_path / "bad.pub").write_text("not a key")
    proc = cli_here("keys", "--out", str(out), "--sign-roster", "--node-key", str(tmp_path / "bad.pub"))
    assert proc.returncode != 0 and "is not a readable OpenSSH public key" in proc.stderr


def test_existing_keys_are_never_overwritten_without_force(cli_here, tmp_path):
    out = tmp_path / "keys"
    assert cli_here("keys", "--out", str(out)).returncode == 0
    before = _snapshot(out)
    proc = cli_here("keys", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exist" in lines[0] and "--force" in lines[0]
    assert _snapshot(out) == before
    (out / "ca.key").unlink()  # even one existing file stops the whole write
    proc = cli_here("keys", "--out", str(out))
    assert proc.returncode == 2 and not (out / "ca.key").exists()
    assert cli_here("keys", "--out", str(out), "--force").returncode == 0
    after = _snapshot(out)
    assert after.keys() == before.keys() and after["ca.crt"] != before["ca.crt"]
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert cli_here("keys", "--out", str(out / "x"), "--nodes", "-1").returncode == 2


@pytest.mark.slow
def test_a_real_superlink_serves_tls_with_these_keys(cli_here, tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    assert cli_here("keys", "--out", str(keys)).returncode == 0
    assert cli_here("keys", "--out", str(other)).returncode == 0
    bindir = Path(sys.executable).parent
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    link = subprocess.Popen(
        [shutil.which("flower-superlink", path=str(bindir)), "--ssl-ca-certfile", str(keys / "ca.crt"),
         "--ssl-certfile", str(keys / "superlink.crt"), "--ssl-keyfile", str(keys / "superlink.key"),
         "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
         "--disable-runtime-dependency-installation", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def handshake(ca: Path, host: str) -> str:
            ctx = ssl.create_default_context(cafile=str(ca))
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname=host) as tls:
                    return tls.version()

        deadline = time.monotonic() + 60
        while True:
            try:
                assert handshake(keys / "ca.crt", "localhost").startswith("TLS")
                break
            except (ConnectionRefusedError, OSError):
                if time.monotonic() > deadline or link.poll() is not None:
                    raise
                time.sleep(0.5)
        assert handshake(keys / "ca.crt", "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            handshake(other / "ca.crt", "localhost")  # a client trusting another federation's CA
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            handshake(keys / "ca.crt", "not-in-the-certificate.example")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)  # plaintext to the TLS port
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
