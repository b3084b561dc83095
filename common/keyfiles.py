"""Reading key files: the one place that reads a private key in PEM or OpenSSH form, and a public
key as PEM or one OpenSSH line. Callers check the key type they need and raise their own error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

KEY_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)  # what parsing a malformed key raises


def read_key_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``; ``error`` with one line naming ``what`` when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror})") from None


def parse_private_key(data: bytes) -> Any:
    """An unencrypted private key, OpenSSH or PEM (raises one of :data:`KEY_ERRORS`)."""
    if data.lstrip().startswith(b"-----BEGIN OPENSSH"):
        return serialization.load_ssh_private_key(data, None)
    return serialization.load_pem_private_key(data, None)


def parse_public_key(data: bytes) -> Any:
    """A public key, PEM or one OpenSSH line (raises one of :data:`KEY_ERRORS`)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(data)
    return serialization.load_ssh_public_key(b" ".join(data.split()[:2]))
