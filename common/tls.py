"""Checks on the key material and the network path of a real federation, before Flower starts.

Flower's SuperLink and SuperNode report a bad certificate or an unreachable peer as a log line
deep in their output, or retry for ever. ``fedpriv server start`` and ``fedpriv node join`` run
these checks first, so that each mistake is one clear line, and every wait is bounded.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpriv.common.errors import FedprivError
from fedpriv.common.keyfiles import KEY_ERRORS, PassphraseError, is_protected, parse_private_key, passphrase


class DeploymentError(FedprivError):
    """Key material, an address or a peer of a real federation cannot be used."""


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DeploymentError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise DeploymentError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise DeploymentError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificate(path: Path, what: str, now: datetime.datetime | None = None) -> x509.Certificate:
    """A PEM certificate that is valid now; anything else is a :class:`DeploymentError`."""
    data = read_file(path, what)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise DeploymentError(f"{what} {path} is not a PEM certificate") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise DeploymentError(f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                              "create new keys with fedpriv keys")
    if cert.not_valid_before_utc > now:
        raise DeploymentError(f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                              "UTC (check this machine's clock)")
    return cert


def load_cert_chain(context: ssl.SSLContext, certfile: Path, keyfile: Path) -> None:
    """``context.load_cert_chain``, for a protected key too (the passphrase of common.keyfiles,
    checked first so that a missing or wrong one is a clear :class:`PassphraseError`; OpenSSL then
    decrypts the key in memory)."""
    secret = None
    data = read_file(keyfile, "key")
    if is_protected(data):
        try:
            parse_private_key(data)
        except PassphraseError as exc:
            raise PassphraseError(f"{keyfile}: {exc}") from None
        secret = passphrase()
    context.load_cert_chain(str(certfile), str(keyfile), password=secret)


def check_key_pair(cert: x509.Certificate, key_path: Path, what: str) -> None:
    """The PEM private key at ``key_path`` is the one ``cert`` certifies."""
    data = read_file(key_path, what)
    try:
        key = parse_private_key(data)
    except PassphraseError as exc:
        raise DeploymentError(f"{what} {key_path}: {exc}") from None
    except KEY_ERRORS:
        raise DeploymentError(f"{what} {key_path} is not a PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.PEM, pub):
        raise DeploymentError(f"{what} {key_path} does not belong to the certificate beside it")


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise DeploymentError(f"{what} was not signed by the federation CA ({type(exc).__name__})") from None


def subject_names(cert: x509.Certificate) -> list[str]:
    """The certificate's subject alternative names (DNS names and IP addresses)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_node_key(path: Path) -> str:
    """The SuperNode authentication key: an OpenSSH EC private key, as Flower requires.
    Returns the matching public key line (what the SuperLink must have registered)."""
    data = read_file(path, "node key")
    try:
        key = parse_private_key(data)
    except PassphraseError as exc:
        raise DeploymentError(f"node key {path}: {exc}") from None
    except (ValueError, TypeError, Exception):  # unsupported formats raise assorted errors
        raise DeploymentError(f"node key {path} is not an OpenSSH or PEM private key "
                              "(as fedpriv keys writes them)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"node key {path} is not an EC key; Flower's node authentication needs "
                              "an EC (NIST curve) key")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def check_node_public_key(path: Path) -> None:
    data = read_file(path, "node public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, Exception):
        raise DeploymentError(f"node public key {path} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeploymentError(f"node public key {path} is not an EC key; Flower's node authentication "
                              "needs an EC (NIST curve) key")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, what: str = "address") -> Address:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``), without a URL scheme."""
    raw = text.strip()
    if "://" in raw:
        raise DeploymentError(f"{what} {text!r} must be HOST:PORT, without a scheme like https://")
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{what} {text!r} is not HOST:PORT")
    return Address(host, int(port))


def wait_for_port(address: Address, attempts: int, first_delay: float = 0.5,
                  connect_timeout: float = 3.0) -> None:
    """Connect over TCP, retrying with doubling delays; give up after ``attempts`` tries."""
    delay, last = first_delay, ""
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((address.host, address.port), timeout=connect_timeout):
                return
        except OSError as exc:
            last = exc.strerror or type(exc).__name__
        if attempt < attempts:
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise DeploymentError(f"cannot reach the SuperLink at {address} after {attempts} attempt"
                          f"{'s' if attempts != 1 else ''} ({last})")


def check_tls(address: Address, root_cert: Path, timeout: float = 5.0,
              client_cert: tuple[Path, Path] | None = None) -> None:
    """Complete a TLS handshake with the SuperLink, verifying its certificate against
    ``root_cert`` and its name against ``address.host`` (presenting ``client_cert``, a certificate
    and key, if given: the operators' port asks for one)."""
    context = ssl.create_default_context(cafile=str(root_cert))
    if client_cert is not None:
        try:
            load_cert_chain(context, client_cert[0], client_cert[1])
        except (ssl.SSLError, OSError, PassphraseError) as exc:
            raise DeploymentError(f"cannot use the certificate {client_cert[0]} with the key {client_cert[1]} "
                                  f"({exc})") from None
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=address.host):
                return
    except ssl.SSLCertVerificationError as exc:
        raise DeploymentError(
            f"the SuperLink at {address} failed TLS verification against {root_cert}: "
            f"{exc.verify_message or exc.reason} (is this the federation's CA, and is {address.host} "
            "one of the names in its certificate?)") from None
    except ssl.SSLError as exc:
        raise DeploymentError(f"the SuperLink at {address} does not speak TLS ({exc.reason or exc}); "
                              "fedpriv never connects in plaintext unless --insecure is given") from None
    except OSError as exc:
        raise DeploymentError(f"cannot reach the SuperLink at {address} ({exc.strerror or exc})") from None
