"""Reading and writing private key files: the one place that parses a private key (PEM or
OpenSSH, passphrase-protected or not) and a public key (PEM or one OpenSSH line), and that writes
a private key passphrase-protected. Callers check the key type they need and raise their own error.

A passphrase is read from the file ``$FEDPRIV_KEY_PASSPHRASE_FILE`` names (its first line), else
from ``$FEDPRIV_KEY_PASSPHRASE`` (held out of child processes, :mod:`common.secret_env`); never
from a command line. Every protected key, node keys included, is written as PEM ``ENCRYPTED
PRIVATE KEY``: PKCS#8 ``EncryptedPrivateKeyInfo`` with PBES2, the scrypt KDF and AES-256-CBC (RFC
8018, RFC 7914). scrypt runs at N = 2**14, r = 8, p = 5, one of OWASP's equivalent minimum settings
(Password Storage Cheat Sheet) whose memory (16 MiB) stays within OpenSSL's default limit, so
``openssl pkey`` reads these files too. ``cryptography`` reads this form but writes PKCS#8 only with
PBKDF2 at 2,048 iterations, so the DER is assembled here from ``cryptography``'s scrypt and AES; drop
:func:`_pkcs8_scrypt` for ``cryptography``'s own writer once it takes a KDF choice for PKCS#8.
(Protected OpenSSH keys would need the ``bcrypt`` package; OpenSSH keys that are protected are read.)

Flower's processes read their key files themselves and take no passphrase: a protected key they
need is decrypted in memory and handed to them through an anonymous in-memory file
(:func:`memory_file`, Linux ``memfd``), never written to disk in plaintext.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedpriv.common import secret_env
from fedpriv.common.errors import FedprivError

KEY_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)  # what parsing a malformed key raises
PASSPHRASE_ENV = secret_env.PASSPHRASE_ENV
PASSPHRASE_FILE_ENV = "FEDPRIV_KEY_PASSPHRASE_FILE"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 5
MIN_PASSPHRASE = 8
WRAPPED_PREFIX = b"fedpriv-protected-key:scrypt:aes-256-gcm:"  # a wrapped secret key (wrap_secret)


class PassphraseError(FedprivError, ValueError):
    """A protected key without its passphrase, or with a wrong one."""


def read_key_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``; ``error`` with one line naming ``what`` when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror})") from None


def passphrase(env: Mapping[str, str] | None = None) -> bytes | None:
    """The key passphrase: the first line of ``$FEDPRIV_KEY_PASSPHRASE_FILE``, else
    ``$FEDPRIV_KEY_PASSPHRASE``; None when neither is set."""
    source = os.environ if env is None else env
    if source.get(PASSPHRASE_FILE_ENV):
        path = Path(source[PASSPHRASE_FILE_ENV])
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise PassphraseError(f"cannot read the passphrase file {path} ({exc.strerror})") from None
        if not lines or not lines[0]:
            raise PassphraseError(f"the passphrase file {path} is empty")
        return lines[0]
    value = secret_env.get(PASSPHRASE_ENV, env)
    return value.encode() if value else None


def new_passphrase_required(env: Mapping[str, str] | None = None) -> bytes:
    """The passphrase to protect new keys with; it must be set and at least 8 bytes."""
    value = passphrase(env)
    if value is None:
        raise PassphraseError(f"protecting keys needs a passphrase: put it in a file named by "
                              f"${PASSPHRASE_FILE_ENV}, or in ${PASSPHRASE_ENV} (never on the command line)")
    if len(value) < MIN_PASSPHRASE:
        raise PassphraseError(f"the key passphrase must be at least {MIN_PASSPHRASE} characters")
    return value


def is_protected(data: bytes) -> bool:
    """Whether ``data`` is a passphrase-protected key: a private key (PEM or OpenSSH), or a secret
    key wrapped by :func:`wrap_secret` (the sealing key)."""
    text = data.lstrip()
    if text.startswith(WRAPPED_PREFIX):
        return True
    if text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY") or b"Proc-Type: 4,ENCRYPTED" in text[:200]:
        return True
    if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
        body = b"".join(text.splitlines()[1:-1])
        try:
            raw = base64.b64decode(body)
        except ValueError:
            return False
        # openssh-key-v1\0, then the cipher name as a length-prefixed string: "none" if unprotected
        start = len(b"openssh-key-v1\0")
        size = int.from_bytes(raw[start:start + 4], "big")
        return raw[start + 4:start + 4 + size] != b"none"
    return False


def parse_private_key(data: bytes, env: Mapping[str, str] | None = None) -> Any:
    """A private key, OpenSSH or PEM, protected or not (raises one of :data:`KEY_ERRORS`;
    :class:`PassphraseError`, one of them, for a protected key without or with a wrong passphrase)."""
    secret = None
    if is_protected(data):
        secret = passphrase(env)
        if secret is None:
            raise PassphraseError(f"it is passphrase-protected: give the passphrase in a file named by "
                                  f"${PASSPHRASE_FILE_ENV}, or in ${PASSPHRASE_ENV}")
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH"):
            return serialization.load_ssh_private_key(data, secret)
        return serialization.load_pem_private_key(data, secret)
    except ValueError as exc:
        if secret is not None:
            raise PassphraseError("wrong passphrase (or the key file is damaged)") from exc
        raise


def parse_public_key(data: bytes) -> Any:
    """A public key, PEM or one OpenSSH line (raises one of :data:`KEY_ERRORS`)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(data)
    return serialization.load_ssh_public_key(b" ".join(data.split()[:2]))


def private_pem(key: Any, secret: bytes | None = None) -> bytes:
    """``key`` as PKCS#8 PEM: protected with ``secret`` (scrypt, AES-256-CBC) when given."""
    if secret is None:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    body = base64.encodebytes(_pkcs8_scrypt(der, secret)).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END ENCRYPTED PRIVATE KEY-----\n"


def private_openssh(key: Any) -> bytes:
    """``key`` in OpenSSH form, unprotected (the form Flower's SuperNode reads)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def private_key_file(key: Any, openssh: bool = False, secret: bytes | None = None) -> bytes:
    """A private key file's bytes: protected PKCS#8 PEM with ``secret``; else OpenSSH when
    ``openssh`` (node keys), else PKCS#8 PEM."""
    if secret is not None:
        return private_pem(key, secret)
    return private_openssh(key) if openssh else private_pem(key)


def memory_file(data: bytes, name: str = "fedpriv-key") -> tuple[int, str]:
    """An anonymous in-memory file holding ``data`` (Linux ``memfd``): its descriptor, to pass to
    a child (``pass_fds``), and the path the child opens it by (``/dev/fd/N``; each open reads it
    from the start). It never reaches a disk."""
    if not hasattr(os, "memfd_create"):
        raise PassphraseError("handing a passphrase-protected key to Flower needs Linux (memfd_create); "
                              "use an unprotected key on this platform")
    fd = os.memfd_create(name, 0)  # (no MFD_CLOEXEC: the child inherits it through pass_fds)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd, f"/dev/fd/{fd}"


def key_for_flower(path: Path, openssh: bool = False) -> tuple[str, list[int]]:
    """The key file argument for a Flower process, and the descriptors it must inherit: ``path``
    itself when the key is unprotected (and, for ``openssh``, already in OpenSSH form); else the key
    decrypted into an in-memory file (:func:`memory_file`), in OpenSSH form when ``openssh``."""
    data = Path(path).read_bytes()
    ready = not is_protected(data) and (not openssh or data.lstrip().startswith(b"-----BEGIN OPENSSH"))
    if ready:
        return str(path), []
    key = parse_private_key(data)
    fd, name = memory_file(private_openssh(key) if openssh else private_pem(key))
    return name, [fd]


# ---- PKCS#8 EncryptedPrivateKeyInfo with PBES2 / scrypt / AES-256-CBC (RFC 8018, RFC 7914) --------
_PBES2 = "1.2.840.113549.1.5.13"
_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_AES256_CBC = "2.16.840.1.101.3.4.1.42"


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _sequence(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def wrapping_key(secret: bytes, salt: bytes) -> bytes:
    """A 256-bit key from a passphrase, with the same scrypt settings as protected key files."""
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(secret)


def wrap_secret(key: bytes, secret: bytes) -> bytes:
    """A secret key (the sealing key) protected with a passphrase: :data:`WRAPPED_PREFIX`, then
    base64 of salt, nonce and the key sealed with AES-256-GCM under :func:`wrapping_key`."""
    salt, nonce = os.urandom(16), os.urandom(12)
    wrapped = AESGCM(wrapping_key(secret, salt)).encrypt(nonce, key, WRAPPED_PREFIX)
    return WRAPPED_PREFIX + base64.b64encode(salt + nonce + wrapped)


def unwrap_secret(data: bytes, env: Mapping[str, str] | None = None) -> bytes:
    """The secret key :func:`wrap_secret` protected; :class:`PassphraseError` without the
    passphrase, or with a wrong one."""
    secret = passphrase(env)
    if secret is None:
        raise PassphraseError(f"it is passphrase-protected: give the passphrase in a file named by "
                              f"${PASSPHRASE_FILE_ENV}, or in ${PASSPHRASE_ENV}")
    try:
        blob = base64.b64decode(data.strip()[len(WRAPPED_PREFIX):], validate=True)
    except ValueError:
        blob = b""
    salt, nonce, wrapped = blob[:16], blob[16:28], blob[28:]
    try:
        return AESGCM(wrapping_key(secret, salt)).decrypt(nonce, wrapped, WRAPPED_PREFIX)
    except (InvalidTag, ValueError):
        raise PassphraseError("wrong passphrase (or the key file is damaged)") from None


def _pkcs8_scrypt(der: bytes, secret: bytes) -> bytes:
    salt, iv = os.urandom(16), os.urandom(16)
    key = wrapping_key(secret, salt)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(der) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    kdf = _sequence(_oid(_SCRYPT), _sequence(_der(0x04, salt), _integer(SCRYPT_N), _integer(SCRYPT_R),
                                             _integer(SCRYPT_P), _integer(32)))
    scheme = _sequence(_oid(_AES256_CBC), _der(0x04, iv))
    return _sequence(_sequence(_oid(_PBES2), _sequence(kdf, scheme)), _der(0x04, encrypted))
