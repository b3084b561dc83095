"""Sealed artefacts: global-model checkpoints and the final model, encrypted at rest with
AES-256-GCM (``cryptography``).

The key never comes from the run configuration: it is read from ``$FEDPRIV_CHECKPOINT_KEY``
(base64 of 32 bytes) or from the file named by ``$FEDPRIV_CHECKPOINT_KEY_FILE`` (as
``fedpriv keys`` writes it). A sealed file is::

    MAGIC (8 bytes) | binding length (2 bytes) | binding | nonce (12 bytes) | AES-GCM(key, nonce, npz, aad)

where the binding is the JSON ``{"role": ..., "run": ...}`` naming what the file is (a checkpoint,
the final model) and the run it belongs to, readable without the key, and ``aad`` is everything
before the nonce. A file moved between runs or roles is refused by name before decryption; one whose
binding was edited to hide that fails authentication, as does any altered, truncated or foreign byte
and any wrong key. Nothing is ever loaded from a file that does not verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpriv.common.errors import FedprivError
from fedpriv.common import key_providers, keyfiles, rundir, secret_env
from fedpriv.common.fileio import create_private, write_atomic

MAGIC = b"FPSEAL02"
OLD_MAGICS = (b"FPCKPT01",)  # checkpoints of fedpriv before sealed artefacts were bound to a run
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ENV = secret_env.CHECKPOINT_KEY_ENV  # (held out of child processes: common/secret_env.py)
KEY_FILE_ENV = "FEDPRIV_CHECKPOINT_KEY_FILE"
CHECKPOINT = rundir.CHECKPOINT
ROLE_CHECKPOINT = "checkpoint"  # what a resume continues from
ROLE_MODEL = "model"  # the run's final global model
ROLE_DATA = "data"  # a node's training data (fedpriv data seal), bound to no run: its "run" is ""
ROLES = (ROLE_CHECKPOINT, ROLE_MODEL, ROLE_DATA)
DEFAULT_KEY_FILE = rundir.CHECKPOINT_KEY


class CheckpointError(FedprivError):
    """A checkpoint or its key cannot be used."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def encode_key(key: bytes, secret: bytes | None = None) -> bytes:
    """A key file's content: base64 of the key, or with a passphrase ``secret`` the key wrapped
    (:func:`common.keyfiles.wrap_secret`)."""
    return (base64.b64encode(key) if secret is None else keyfiles.wrap_secret(key, secret)) + b"\n"


def _decode_key(raw: bytes, where: str, env: Mapping[str, str] | None = None) -> bytes:
    text = raw.strip()
    if text.startswith(keyfiles.WRAPPED_PREFIX):
        try:
            key = keyfiles.unwrap_secret(text, env)
        except keyfiles.PassphraseError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    else:
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
            create_private(path, encode_key(new_key(), keyfiles.passphrase()))  # protected if a passphrase is set
        except FileExistsError:  # another run created it meanwhile
            pass
    os.environ[KEY_FILE_ENV] = str(path)
    key = key_from_environment()
    assert key is not None
    return key


def key_source(env: Mapping[str, str] | None = None) -> str:
    """Where :func:`key_from_environment` takes the key from, in words."""
    if secret_env.get(KEY_ENV, env):
        return f"${KEY_ENV}"
    env = os.environ if env is None else env
    if env.get(KEY_FILE_ENV):
        return f"the key file {env[KEY_FILE_ENV]}"
    return "no key configured"


def require_key(purpose: str) -> bytes:
    """The configured sealing key, else the default key file when it exists (what ``fedpriv
    simulate`` sealed with); :class:`CheckpointError` saying ``purpose`` when there is neither."""
    key = key_from_environment()
    if key is None and default_key_path().is_file():
        key = ensure_key()
    if key is None:
        raise CheckpointError(f"{purpose}: set ${KEY_ENV} or ${KEY_FILE_ENV} (no default key at {default_key_path()})")
    return key


def key_from_environment(env: Mapping[str, str] | None = None) -> Any:
    """The sealing key from the environment (``$FEDPRIV_CHECKPOINT_KEY``, else the file or the
    PKCS#11 URI ``$FEDPRIV_CHECKPOINT_KEY_FILE`` names: common/key_providers.py), or None when none
    is configured. Bytes, or a token's key object that seals and opens files itself."""
    value = secret_env.get(KEY_ENV, env)
    if value:
        return _decode_key(value.encode(), f"${KEY_ENV}", env)
    name = (os.environ if env is None else env).get(KEY_FILE_ENV)
    return key_from_file(name, env) if name else None


def key_from_file(name: str | Path, env: Mapping[str, str] | None = None) -> Any:
    """The sealing key in the key file ``name`` (opened with this process's passphrase settings,
    or ``env``'s), or in the PKCS#11 token a ``pkcs11:`` URI there names."""
    if key_providers.is_pkcs11(name):
        return key_providers.Pkcs11SealingKey(str(name), env)
    path = Path(name)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint key file {path}: {exc.strerror}") from None
    return _decode_key(raw, f"checkpoint key file {path}", env)


def _aead(key: Any) -> Any:
    """AES-256-GCM with ``key``: the key's bytes (a file or the environment), or a key that does
    the sealing itself (a PKCS#11 token's, common/key_providers.py)."""
    return AESGCM(key) if isinstance(key, (bytes, bytearray)) else key


def key_id(key: Any) -> str:
    """A sealing key's public name: 16 hex digits of a domain-separated SHA-256 of its bytes (it
    reveals nothing usable about a 256-bit key), or a token key's own."""
    if isinstance(key, (bytes, bytearray)):
        return hashlib.sha256(b"fedpriv sealing key id\0" + bytes(key)).hexdigest()[:16]
    return str(key.key_id)


def _binding(role: str, run_id: str) -> bytes:
    if role not in ROLES:
        raise ValueError(f"unknown sealed role {role!r}")
    return json.dumps({"role": role, "run": str(run_id)}, sort_keys=True, separators=(",", ":")).encode()


def seal(arrays: list[np.ndarray], header: Mapping[str, Any], key: bytes, *, role: str, run_id: str) -> bytes:
    """``arrays`` and ``header`` sealed with ``key``, bound to ``role`` and ``run_id``."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, header=np.frombuffer(json.dumps(dict(header)).encode(), dtype=np.uint8))
    binding = _binding(role, run_id)
    prefix = MAGIC + len(binding).to_bytes(2, "big") + binding
    nonce = os.urandom(NONCE_BYTES)
    return prefix + nonce + _aead(key).encrypt(nonce, buffer.getvalue(), prefix)


def binding_of(data: bytes, where: str) -> tuple[dict[str, str], int]:
    """The (unauthenticated) binding of a sealed file and where its nonce starts."""
    if data[:len(MAGIC)] in OLD_MAGICS:
        raise CheckpointError(f"{where} was sealed by an older fedpriv, whose files are not bound to a run; "
                              f"it cannot be read by this version")
    start = len(MAGIC) + 2
    if len(data) < start or not data.startswith(MAGIC):
        raise CheckpointError(f"{where} is not a file sealed by fedpriv (or is truncated)")
    end = start + int.from_bytes(data[len(MAGIC):start], "big")
    if len(data) < end + NONCE_BYTES + 16:
        raise CheckpointError(f"{where} is truncated (or is not a file sealed by fedpriv)")
    try:
        binding = json.loads(data[start:end].decode())
        if not (isinstance(binding, dict) and isinstance(binding.get("role"), str)
                and isinstance(binding.get("run"), str)):
            raise ValueError(binding)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{where} is not a file sealed by fedpriv (its binding is unreadable)") from None
    return binding, end


def unseal(data: bytes, key: bytes, where: str = "checkpoint", *, role: str,
           run_id: str | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The arrays and header of a sealed file, which must be a ``role`` (of run ``run_id``, when
    given: a resume knows its run id from the ledger). A file of another role or run is refused by
    name; a binding altered to pass fails authentication."""
    binding, end = binding_of(data, where)
    if binding["role"] != role:
        raise CheckpointError(f"{where} is a sealed {binding['role']}, not a {role}: refusing to use it as one")
    if run_id is not None and binding["run"] != run_id:
        raise CheckpointError(f"{where} was sealed for run {binding['run']}, not for this run ({run_id}): "
                              f"refusing a file moved between runs")
    nonce = data[end:end + NONCE_BYTES]
    try:
        plain = _aead(key).decrypt(nonce, data[end + NONCE_BYTES:], data[:end])
    except InvalidTag:
        raise CheckpointError(f"{where} failed authentication: it was altered, or the key is wrong") from None
    with np.load(io.BytesIO(plain), allow_pickle=False) as npz:
        header = json.loads(bytes(npz["header"]).decode())
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files) - 1)]
    return arrays, header


def write_sealed(path: Path, arrays: list[np.ndarray], header: Mapping[str, Any], key: bytes, *,
                 role: str, run_id: str) -> None:
    write_atomic(path, seal(arrays, header, key, role=role, run_id=run_id))


def read_sealed(path: Path, key: bytes, *, role: str, run_id: str | None = None,
                what: str | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    what = what or role
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror}") from None
    return unseal(data, key, f"{what} {path}", role=role, run_id=run_id)


def read_model(path: Path, key: bytes, run_id: str | None) -> list[np.ndarray]:
    """The final model of run ``run_id`` (the run's ``model.sealed``), authenticated."""
    return read_sealed(path, key, role=ROLE_MODEL, run_id=run_id, what="model")[0]


def is_sealed(path: Path) -> bool:
    """Whether ``path`` starts like a file fedpriv sealed (of any version)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(MAGIC))
    except OSError:
        return False
    return start == MAGIC or start in OLD_MAGICS


def seal_data(x: np.ndarray, y: np.ndarray, key: bytes, source: str) -> bytes:
    """A node's training data (``x``, ``y``) sealed for ``fedpriv data seal``."""
    return seal([x, y], {"source": source}, key, role=ROLE_DATA, run_id="")


def read_data(path: Path, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` of a sealed data file, decrypted in memory only."""
    arrays, _ = read_sealed(path, key, role=ROLE_DATA, run_id="", what="sealed data file")
    if len(arrays) != 2:
        raise CheckpointError(f"sealed data file {path} does not hold x and y")
    return arrays[0], arrays[1]


def write_checkpoint(path: Path, arrays: list[np.ndarray], header: Mapping[str, Any], key: bytes, *,
                     run_id: str) -> None:
    write_sealed(path, arrays, header, key, role=ROLE_CHECKPOINT, run_id=run_id)


def read_checkpoint(path: Path, key: bytes, run_id: str | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    return read_sealed(path, key, role=ROLE_CHECKPOINT, run_id=run_id, what="checkpoint")
