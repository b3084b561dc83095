"""Where the sealing key and the ledger-signing key come from: one interface, three providers.

- **a file**: ``$FEDPRIV_CHECKPOINT_KEY_FILE`` / ``$FEDPRIV_LEDGER_KEY`` name a key file (as
  ``fedpriv keys`` writes them, passphrase-protected or not; :mod:`common.keyfiles`);
- **an environment variable**: ``$FEDPRIV_CHECKPOINT_KEY`` holds the sealing key itself (base64),
  held out of child processes (:mod:`common.secret_env`);
- **PKCS#11**: either variable holds a PKCS#11 URI (RFC 7512), ``pkcs11:token=LABEL;object=LABEL``,
  and the key lives in a token, a hardware security module or SoftHSM2. It never leaves the token:
  AES-256-GCM sealing (``CKM_AES_GCM``) and Ed25519 signing (``CKM_EDDSA``) run inside it, through
  ``python-pkcs11``. The module is ``$FEDPRIV_PKCS11_MODULE`` (the PKCS#11 library's path); the
  user PIN comes from the file ``$FEDPRIV_PKCS11_PIN_FILE`` names, else ``$FEDPRIV_PKCS11_PIN``.

Every provider gives the same objects: a sealing key has ``encrypt(nonce, data, aad)`` and
``decrypt(nonce, data, aad)`` with the output of ``cryptography``'s ``AESGCM`` (ciphertext, then the
16-byte tag), so a file sealed in a token opens with the same key anywhere that key is; a signing
key has ``sign(data)`` and ``public_key()`` like ``cryptography``'s ``Ed25519PrivateKey``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpriv.common import secret_env
from fedpriv.common.errors import FedprivError

PKCS11_SCHEME = "pkcs11:"
MODULE_ENV = "FEDPRIV_PKCS11_MODULE"
PIN_ENV = secret_env.PKCS11_PIN_ENV
PIN_FILE_ENV = "FEDPRIV_PKCS11_PIN_FILE"
_ED25519_OID = "1.3.101.112"


class KeyProviderError(FedprivError):
    """A key reference that cannot be used."""


def is_pkcs11(reference: str | os.PathLike[str] | None) -> bool:
    return reference is not None and str(reference).startswith(PKCS11_SCHEME)


def parse_uri(uri: str) -> dict[str, str]:
    """The path attributes of a PKCS#11 URI (``token``, ``object``, ...), percent-decoded."""
    if not is_pkcs11(uri):
        raise KeyProviderError(f"{uri!r} is not a PKCS#11 URI (pkcs11:token=LABEL;object=LABEL)")
    path = uri[len(PKCS11_SCHEME):].split("?", 1)[0]
    attributes = {}
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep:
            raise KeyProviderError(f"PKCS#11 URI {uri!r}: {part!r} is not NAME=VALUE")
        attributes[name] = unquote(value)
    if not attributes.get("token") or not attributes.get("object"):
        raise KeyProviderError(f"PKCS#11 URI {uri!r} must name a token and an object (pkcs11:token=T;object=O)")
    return attributes


def _pin(env: Mapping[str, str] | None) -> str:
    source = os.environ if env is None else env
    if source.get(PIN_FILE_ENV):
        try:
            return Path(source[PIN_FILE_ENV]).read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise KeyProviderError(f"cannot read the PKCS#11 PIN file {source[PIN_FILE_ENV]} "
                                   f"({getattr(exc, 'strerror', None) or 'empty'})") from None
    pin = secret_env.get(PIN_ENV, env)
    if not pin:
        raise KeyProviderError(f"a PKCS#11 key needs the token's user PIN: put it in a file named by "
                               f"${PIN_FILE_ENV}, or in ${PIN_ENV}")
    return pin


_LIBS: dict[str, Any] = {}  # one loaded library per module path: a PKCS#11 module is initialised once
_SESSIONS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def _session(uri: str, env: Mapping[str, str] | None) -> Any:
    """An open, logged-in session with the URI's token (one per module and token, kept open)."""
    import pkcs11

    source = os.environ if env is None else env
    module = source.get(MODULE_ENV)
    if not module:
        raise KeyProviderError(f"a PKCS#11 key needs the PKCS#11 library: set ${MODULE_ENV} to its path")
    label = parse_uri(uri)["token"]
    with _LOCK:
        if (module, label) not in _SESSIONS:
            try:
                if module not in _LIBS:
                    _LIBS[module] = pkcs11.lib(module)
                token = _LIBS[module].get_token(token_label=label)
                _SESSIONS[(module, label)] = token.open(user_pin=_pin(env), rw=True)
            except pkcs11.exceptions.NoSuchToken:
                raise KeyProviderError(f"no PKCS#11 token labelled {label!r} in {module}") from None
            except pkcs11.exceptions.PinIncorrect:
                raise KeyProviderError(f"the PKCS#11 PIN for token {label!r} is wrong") from None
            except (RuntimeError, OSError, pkcs11.exceptions.PKCS11Error) as exc:
                raise KeyProviderError(f"cannot open PKCS#11 token {label!r} with {module} "
                                       f"({type(exc).__name__}: {exc})") from None
        return _SESSIONS[(module, label)]


def open_configured(env: Mapping[str, str] | None = None) -> None:
    """Open the tokens the configured keys name, if any, before TensorFlow starts: SoftHSM2 2.6
    crashed (SIGSEGV in its C_Initialize) when first loaded late in a ``fedpriv simulate`` process,
    after TensorFlow, Flower and the model were up, and runs cleanly when loaded first. The
    ``fedpriv`` command calls this before anything else, and the ServerApp before TensorFlow."""
    source = os.environ if env is None else env
    for name in ("FEDPRIV_CHECKPOINT_KEY_FILE", "FEDPRIV_LEDGER_KEY"):
        if is_pkcs11(source.get(name)):
            _session(str(source[name]), env)


def _object(uri: str, env: Mapping[str, str] | None, object_class: Any, key_type: Any) -> Any:
    import pkcs11

    session = _session(uri, env)
    label = parse_uri(uri)["object"]
    try:
        return session.get_key(label=label, object_class=object_class, key_type=key_type)
    except pkcs11.exceptions.NoSuchKey:
        raise KeyProviderError(f"the PKCS#11 token has no {key_type.name} {object_class.name} labelled {label!r} "
                               f"({uri})") from None
    except pkcs11.exceptions.MultipleObjectsReturned:
        raise KeyProviderError(f"the PKCS#11 token has several keys labelled {label!r}") from None


class Pkcs11SealingKey:
    """An AES-256 key in a token; the same interface as ``cryptography``'s ``AESGCM``."""

    def __init__(self, uri: str, env: Mapping[str, str] | None = None) -> None:
        from pkcs11 import KeyType, ObjectClass

        self.uri = uri
        self._key = _object(uri, env, ObjectClass.SECRET_KEY, KeyType.AES)
        # A public name for the key: the token and label (the key's bytes are never seen).
        self.key_id = hashlib.sha256(f"fedpriv pkcs11 key\0{uri}".encode()).hexdigest()[:16]

    def _gcm(self, nonce: bytes, aad: bytes) -> Any:
        from pkcs11.mechanisms import GCMParams

        return GCMParams(nonce, aad, 128)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        from pkcs11 import Mechanism

        with _LOCK:
            return bytes(self._key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=self._gcm(nonce, aad)))

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from pkcs11 import Mechanism
        from pkcs11.exceptions import PKCS11Error

        try:
            with _LOCK:
                return bytes(self._key.decrypt(data, mechanism=Mechanism.AES_GCM,
                                               mechanism_param=self._gcm(nonce, aad)))
        except PKCS11Error:  # SoftHSM2 reports a failed tag check as a general error
            raise InvalidTag() from None


class Pkcs11SigningKey:
    """An Ed25519 private key in a token; signs like ``Ed25519PrivateKey``."""

    def __init__(self, uri: str, env: Mapping[str, str] | None = None) -> None:
        from pkcs11 import Attribute, KeyType, ObjectClass

        self.uri = uri
        self._private = _object(uri, env, ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS)
        public = _object(uri, env, ObjectClass.PUBLIC_KEY, KeyType.EC_EDWARDS)
        point = bytes(public[Attribute.EC_POINT])
        raw = point[2:] if len(point) == 34 and point[0] == 0x04 else point  # DER OCTET STRING, or raw
        self._public = Ed25519PublicKey.from_public_bytes(raw)

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism

        with _LOCK:
            return bytes(self._private.sign(data, mechanism=Mechanism.EDDSA))

    def public_key(self) -> Ed25519PublicKey:
        return self._public


def generate(uri_sealing: str, uri_signing: str, env: Mapping[str, str] | None = None) -> None:
    """Generate the sealing key (AES-256) and the ledger-signing key (Ed25519) inside their tokens,
    non-extractable: what ``fedpriv keys pkcs11`` does."""
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    session = _session(uri_sealing, env)
    with _LOCK:
        session.generate_key(KeyType.AES, 256, label=parse_uri(uri_sealing)["object"], store=True,
                             template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    session = _session(uri_signing, env)
    with _LOCK:
        session.generate_keypair(
            KeyType.EC_EDWARDS, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True,
            label=parse_uri(uri_signing)["object"],
            public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(_ED25519_OID)},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
