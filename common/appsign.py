"""Signed apps: the one home of app signing, checked by nodes before any app code runs.

A Flower app travels to nodes as a FAB (a zip of the app's files). Flower 1.42 cannot verify a
self-hosted FAB: its SuperNode's ``--trusted-entities`` only checks bundles with a Hub licence,
and a SuperLink drops the verifications of a FAB submitted with ``flwr run``. So anybody who can
submit a run could send nodes code that reads their data. fedpriv nodes therefore run only
bundles signed by a key they trust:

- the signature is Ed25519 over ``b"fedpriv-app-v1\\0" + sha256(FAB)`` (the same hash Flower
  computes, ``Fab.hash_str``), made with the federation's ``app-signing.key`` (``fedpriv keys``);
- it travels in the run config, ``run.app_signature`` (``fedpriv server run`` sets it, and
  ``fedpriv app sign`` prints it for a plain ``flwr run``), as text that names its signer:
  ``ed25519:<public key>:<signature>`` (base64);
- the node (:mod:`clients.app_gate`) checks it in its own process, with keys kept on the node,
  over the bytes it is about to install, and refuses the task otherwise (:class:`AppRefused`).

When Flower can verify self-hosted bundles on the SuperNode, sign with Flower's tooling, give
the nodes ``--trusted-entities`` and drop this module, ``clients/app_gate.py`` and
``run.app_signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpriv.common.errors import FedprivError
from fedpriv.common.keyfiles import KEY_ERRORS, PassphraseError, parse_private_key, parse_public_key, read_key_file
from fedpriv.common.protocol import APP_REFUSED_CODE  # noqa: F401 - the error a node answers a refused app with

APP_KEY, APP_PUB = "app-signing.key", "app-signing.pub"  # written by fedpriv keys
SIGNATURE_SETTING = "run.app_signature"  # the run config key the signature travels in
TRUST_ENV = "FEDPRIV_APP_TRUST"  # the node's trusted public key files (os.pathsep-separated)
_DOMAIN = b"fedpriv-app-v1\x00"
_PREFIX = "ed25519"


class AppRefused(FedprivError):
    """A node refuses to run an app bundle: unsigned, signed by a key it does not trust, or altered."""


def fab_hash(fab: bytes) -> str:
    """Flower's hash of a FAB (``Fab.hash_str``)."""
    return hashlib.sha256(fab).hexdigest()


def _message(hash_hex: str) -> bytes:
    try:
        digest = bytes.fromhex(hash_hex)
    except (ValueError, TypeError):
        digest = b""
    if len(digest) != 32:
        raise AppRefused(f"the app bundle's hash {str(hash_hex)[:16]!r} is not a SHA-256 hex digest")
    return _DOMAIN + digest


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short name of a signing key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def sign_app(fab: bytes, key: Ed25519PrivateKey) -> str:
    """The signature text of a FAB (``run.app_signature``)."""
    signature = key.sign(_message(fab_hash(fab)))
    return ":".join([_PREFIX, base64.b64encode(_raw(key.public_key())).decode(),
                     base64.b64encode(signature).decode()])


def verify_app(hash_hex: str, signature_text: str, trusted: Iterable[Ed25519PublicKey]) -> Ed25519PublicKey:
    """The trusted key that signed the bundle with hash ``hash_hex``; :class:`AppRefused` with a
    one-line reason otherwise."""
    short = str(hash_hex)[:12]
    if not signature_text:
        raise AppRefused(f"app bundle {short} is not signed ({SIGNATURE_SETTING} is empty); this node "
                         f"runs only apps signed by a key it trusts")
    parts = str(signature_text).split(":")
    try:
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise ValueError
        signer = Ed25519PublicKey.from_public_bytes(base64.b64decode(parts[1], validate=True))
        signature = base64.b64decode(parts[2], validate=True)
    except (ValueError, binascii.Error):
        raise AppRefused(f"app bundle {short}: {SIGNATURE_SETTING} is not a fedpriv app signature") from None
    by_name = {_raw(k): k for k in trusted}
    if _raw(signer) not in by_name:
        raise AppRefused(f"app bundle {short} is signed by key {fingerprint(signer)}, which this node "
                         f"does not trust")
    try:
        signer.verify(signature, _message(hash_hex))
    except InvalidSignature:
        raise AppRefused(f"app bundle {short} was altered: its signature by trusted key {fingerprint(signer)} "
                         f"is for other contents") from None
    return by_name[_raw(signer)]


def check_bundle(hash_hex: str, content: bytes, signature_text: str,
                 trusted: Iterable[Ed25519PublicKey]) -> Ed25519PublicKey:
    """A node's whole check of the bundle it is about to install: ``content`` is the bundle its
    hash names (else it was altered in transit or storage), and the signature verifies."""
    if fab_hash(content) != hash_hex:
        raise AppRefused(f"app bundle {str(hash_hex)[:12]} was altered: its contents do not match its hash")
    return verify_app(hash_hex, signature_text, trusted)


# ---- keys -----------------------------------------------------------------------------------
def new_signing_pair() -> tuple[bytes, bytes]:
    """A fresh app-signing key pair: the private key (PKCS#8 PEM) and public key (PEM)."""
    key = Ed25519PrivateKey.generate()
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 app-signing private key (PEM or OpenSSH, passphrase-protected or not)."""
    data = read_key_file(path, "the app-signing key", FedprivError)
    try:
        key = parse_private_key(data)
    except PassphraseError as exc:
        raise FedprivError(f"the app-signing key {path}: {exc}") from None
    except KEY_ERRORS:
        raise FedprivError(f"{path} is not a PEM or OpenSSH private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedprivError(f"{path}: the app-signing key must be an Ed25519 key")
    return key


def load_trusted_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key a node trusts to sign apps: PEM, or one OpenSSH line."""
    data = read_key_file(path, "the trusted app-signing key", FedprivError)
    try:
        key = parse_public_key(data)
    except KEY_ERRORS:
        raise FedprivError(f"{path} is not a PEM or OpenSSH public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedprivError(f"{path}: a trusted app-signing key must be an Ed25519 key")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    return [load_trusted_key(Path(p)) for p in paths]


# ---- bundles --------------------------------------------------------------------------------
def build_app(app: Path) -> bytes:
    """The FAB ``flwr run APP`` sends for the app directory ``app`` (Flower's own builder; it is
    deterministic: the same files give the same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(app))
    except (ValueError, OSError) as exc:
        raise FedprivError(f"cannot build the Flower app in {app}: {exc}") from None


def snapshot_app(app: Path, dest: Path) -> bytes:
    """Build ``app``'s FAB and unpack its files into ``dest``, from which ``flwr run`` builds the
    very same bytes: files that change in ``app`` afterwards cannot change what was signed."""
    fab = build_app(app)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        for name in bundle.namelist():
            if name.startswith(".info/"):  # Flower's manifest, rebuilt from the files
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bundle.read(name))
    if build_app(dest) != fab:
        raise FedprivError(f"the app bundle of {app} cannot be reproduced from its files; "
                           f"cannot sign what flwr run would send")
    return fab
