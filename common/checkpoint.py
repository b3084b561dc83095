"""Global-model checkpoints encrypted at rest with AES-256-GCM (``cryptography``).

The key never comes from the run configuration: it is read from ``$FEDPRIV_CHECKPOINT_KEY``
(base64 of 32 bytes) or from the file named by ``$FEDPRIV_CHECKPOINT_KEY_FILE`` (as
``fedpriv keys`` writes it). A checkpoint is::

    MAGIC (8 bytes) | nonce (12 bytes) | AES-GCM(key, nonce, npz of the arrays and a JSON header, aad=MAGIC)

so any altered, truncated or foreign byte, and any wrong key, fails authentication and is
reported as such; nothing is ever loaded from a checkpoint that does not verify.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpriv.common.errors import FedprivError
from fedpriv.common import rundir
from fedpriv.common.fileio import create_private, write_atomic

MAGIC = b"FPCKPT01"
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ENV = "FEDPRIV_CHECKPOINT_KEY"
KEY_FILE_ENV = "FEDPRIV_CHECKPOINT_KEY_FILE"
CHECKPOINT = "checkpoint.fpck"
DEFAULT_KEY_FILE = rundir.CHECKPOINT_KEY


class CheckpointError(FedprivError):
    """A checkpoint or its key cannot be used."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def encode_key(key: bytes) -> bytes:
    return base64.b64encode(key) + b"\n"


def _decode_key(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"{where} is not a checkpoint key (expected base64 of {KEY_BYTES} bytes)")
    return key


def default_key_path(env: Mapping[str, str] | None = None) -> Path:
    """Where simulations keep their checkpoint key: ``$FEDPRIV_HOME/keys/checkpoint.key``
    (beside the ledger-signing key, never in a run directory)."""
    return rundir.default_checkpoint_key_path(env)


def ensure_key() -> bytes:
    """The configured checkpoint key; with none configured, the default key file, created on
    first use (0600), which this process then names in ``$FEDPRIV_CHECKPOINT_KEY_FILE`` so the
    server seals a checkpoint after every round. ``fedpriv simulate`` calls it."""
    key = key_from_environment()
    if key is not None:
        return key
    path = default_key_path()
    if not path.exists():
        try:
            create_private(path, encode_key(new_key()))
        except FileExistsError:  # another run created it meanwhile
            pass
    os.environ[KEY_FILE_ENV] = str(path)
    key = key_from_environment()
    assert key is not None
    return key


def key_from_environment(env: Mapping[str, str] | None = None) -> bytes | None:
    """The checkpoint key from the environment (``$FEDPRIV_CHECKPOINT_KEY``, else the file
    ``$FEDPRIV_CHECKPOINT_KEY_FILE`` names), or None when none is configured."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return _decode_key(env[KEY_ENV].encode(), f"${KEY_ENV}")
    if env.get(KEY_FILE_ENV):
        path = Path(env[KEY_FILE_ENV])
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint key file {path}: {exc.strerror}") from None
        return _decode_key(raw, f"checkpoint key file {path}")
    return None


def seal(arrays: list[np.ndarray], header: Mapping[str, Any], key: bytes) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, header=np.frombuffer(json.dumps(dict(header)).encode(), dtype=np.uint8))
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, buffer.getvalue(), MAGIC)


def unseal(data: bytes, key: bytes, where: str = "checkpoint") -> tuple[list[np.ndarray], dict[str, Any]]:
    if len(data) < len(MAGIC) + NONCE_BYTES + 16 or not data.startswith(MAGIC):
        raise CheckpointError(f"{where} is not a fedpriv checkpoint (or is truncated)")
    nonce = data[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        plain = AESGCM(key).decrypt(nonce, data[len(MAGIC) + NONCE_BYTES:], MAGIC)
    except InvalidTag:
        raise CheckpointError(f"{where} failed authentication: it was altered, or the key is wrong") from None
    with np.load(io.BytesIO(plain), allow_pickle=False) as npz:
        header = json.loads(bytes(npz["header"]).decode())
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files) - 1)]
    return arrays, header


def write_checkpoint(path: Path, arrays: list[np.ndarray], header: Mapping[str, Any], key: bytes) -> None:
    write_atomic(path, seal(arrays, header, key))


def read_checkpoint(path: Path, key: bytes) -> tuple[list[np.ndarray], dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    return unseal(data, key, f"checkpoint {path}")
