"""Key material for a real federation, made with the ``cryptography`` package.

- a federation CA (EC P-384, self-signed) that signs the SuperLink's TLS certificate;
- the SuperLink's certificate, with every ``--host`` (and localhost, 127.0.0.1) as a subject
  alternative name;
- node authentication key pairs in the OpenSSH format Flower's SuperNode reads
  (``--auth-supernode-private-key``) and ``flwr supernode register`` accepts (EC, NIST P-384);
- the server's Ed25519 ledger-signing key;
- the federation's Ed25519 app-signing key: nodes run only apps signed with it
  (:mod:`common.appsign`; keep it where runs are submitted, give nodes ``app-signing.pub``);
- an AES-256 key for encrypting checkpoints at rest (``$FEDPRIV_CHECKPOINT_KEY_FILE``);
- the node roster (``roster.signed``): the node public keys, signed by the CA key, which the
  SuperLink's ServerApps send to nodes so that they can check each other's SecAgg+ keys
  (:mod:`common.roster`). Re-sign it when nodes join (:func:`roster_file`); the CA key never
  needs to be on the server.

Private keys are written with mode 0600, and nothing is ever overwritten unless asked to.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.common.appsign import APP_KEY, APP_PUB, new_signing_pair
from fedpriv.common.checkpoint import encode_key, new_key
from fedpriv.common.errors import FedprivError
from fedpriv.common.roster import sign_roster
from fedpriv.common import rundir
from fedpriv.common.fileio import write_atomic
from fedpriv.common.keyfiles import PassphraseError, parse_private_key, private_key_file

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SUPERLINK_KEY, SUPERLINK_CERT = "superlink.key", "superlink.crt"
LEDGER_KEY, LEDGER_PUB = rundir.LEDGER_SIGNING_KEY, "ledger-signing.pub"
CHECKPOINT_KEY = rundir.CHECKPOINT_KEY
ROSTER = "roster.signed"
NODES_DIR = "nodes"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class KeyFile:
    path: Path
    data: bytes
    private: bool


def node_key_names(count: int) -> list[str]:
    return [f"node-{i}" for i in range(1, count + 1)]




def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def federation_keys(out: Path, hosts: list[str], nodes: int, days: int, secret: bytes | None = None) -> list[KeyFile]:
    """Everything ``fedpriv keys`` writes, in memory (nothing touches the disk here); every private
    key and the checkpoint key protected with the passphrase ``secret`` when given
    (:mod:`common.keyfiles`)."""
    if nodes < 0:
        raise FedprivError("--nodes must be 0 or more")
    if days < 1:
        raise FedprivError("--days must be at least 1")
    # Loopback names are always included: operators administer the SuperLink from its machine.
    hosts = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = [
        KeyFile(out / CA_KEY, private_key_file(ca_key, secret=secret), True),
        KeyFile(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), False),
        KeyFile(out / SUPERLINK_KEY, private_key_file(link_key, secret=secret), True),
        KeyFile(out / SUPERLINK_CERT, link_cert.public_bytes(serialization.Encoding.PEM), False),
    ]
    for name in node_key_names(nodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        files.append(KeyFile(out / NODES_DIR / name, private_key_file(node_key, openssh=True, secret=secret), True))
        files.append(KeyFile(out / NODES_DIR / f"{name}.pub", node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", False))
    ledger_key = Ed25519PrivateKey.generate()
    files.append(KeyFile(out / LEDGER_KEY, private_key_file(ledger_key, secret=secret), True))
    files.append(KeyFile(out / LEDGER_PUB, ledger_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), False))
    files += app_signing_keys(out, secret)
    files.append(KeyFile(out / CHECKPOINT_KEY, encode_key(new_key(), secret), True))
    node_pubs = [f.data.decode() for f in files if f.path.parent == out / NODES_DIR and f.path.suffix == ".pub"]
    files.append(KeyFile(out / ROSTER, sign_roster(ca_key, [_key_text(p) for p in node_pubs]), False))
    return files


def app_signing_keys(out: Path, secret: bytes | None = None) -> list[KeyFile]:
    """A fresh app-signing key pair (``app-signing.key``, protected with ``secret`` when given, and
    ``app-signing.pub``)."""
    private, public = new_signing_pair()
    if secret is not None:
        private = private_key_file(parse_private_key(private), secret=secret)
    return [KeyFile(out / APP_KEY, private, True), KeyFile(out / APP_PUB, public, False)]


def _key_text(openssh_line: str) -> str:
    """An OpenSSH public key line without its comment (the roster's form)."""
    return " ".join(openssh_line.split()[:2])


def roster_file(keys: Path, extra: list[Path]) -> KeyFile:
    """``keys/roster.signed`` re-signed with ``keys/ca.key`` over every ``keys/nodes/*.pub`` and
    the ``extra`` node public keys (how a node that joins later gets on the roster)."""
    try:
        ca_key = parse_private_key((keys / CA_KEY).read_bytes())
    except OSError as exc:
        raise FedprivError(f"cannot read the CA key {keys / CA_KEY} ({exc.strerror})") from None
    except PassphraseError as exc:
        raise FedprivError(f"the CA key {keys / CA_KEY}: {exc}") from None
    except (ValueError, TypeError):
        raise FedprivError(f"{keys / CA_KEY} is not a PEM private key") from None
    members = []
    for path in [*sorted((keys / NODES_DIR).glob("*.pub")), *extra]:
        try:
            text = _key_text(path.read_text())
            serialization.load_ssh_public_key(text.encode())
        except (OSError, ValueError, UnicodeDecodeError, UnsupportedAlgorithm):
            raise FedprivError(f"{path} is not a readable OpenSSH public key") from None
        members.append(text)
    return KeyFile(keys / ROSTER, sign_roster(ca_key, members), False)


def write_keys(files: list[KeyFile], force: bool) -> None:
    """Write ``files``, every one owner-only (0600): public halves and certificates too, which are
    not secret but are handed over on purpose (copied, mounted), never shared by file mode. Refuse
    (writing nothing) if any exists, unless ``force``."""
    existing = [f.path for f in files if f.path.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise FedprivError(f"{len(existing)} key file(s) already exist ({shown}); nothing was written. "
                           f"Use --force to replace them")
    for f in files:
        write_atomic(f.path, f.data)  # created 0600 (mkstemp)
