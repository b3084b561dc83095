"""The federation's node roster and signed SecAgg+ key advertisements.

In Flower's SecAgg+ the server relays every client's two public keys to its neighbours unsigned,
so a server that deviates from the protocol can substitute keys whose private halves it knows and
read the pairwise masks. fedpriv closes that with two signatures:

- the **roster**: the public keys of the federation's registered nodes, signed by the federation's
  trust anchor (the CA key of ``fedpriv keys``; in simulation, a key the simulation creates). The
  server sends it with each round's SecAgg+ setup; it cannot forge or extend it.
- the **key advertisement**: each node signs its SecAgg+ public keys, bound to the Flower run,
  the round and its node id, with its node authentication key (the key a SuperNode authenticates
  with; in simulation, each virtual node's own key). The advertisement travels in place of the
  second public key, so Flower's server workflow relays it unchanged; neighbours verify it
  against the roster and hand Flower's client code the plain key (:mod:`clients.secagg_guard`).

Node keys are EC (the OpenSSH keys Flower's node authentication reads) or Ed25519; the trust
anchor is a certificate or public key in PEM.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.common.errors import FedprivError
from fedpriv.common.keyfiles import KEY_ERRORS, PassphraseError, parse_private_key, read_key_file

ROSTER_ENV = "FEDPRIV_ROSTER"  # the signed roster file a deployed ServerApp sends to nodes
ROSTER_KEY = "fedpriv_roster"  # the SecAgg+ setup config key the server sends the roster under
ADVERT_MAGIC = b"fedpriv-key-advert-v1\n"
_ADVERT_DOMAIN = b"fedpriv secagg+ key advertisement v1\x00"
_ROSTER_VERSION = 1

PrivateKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey


class RosterError(FedprivError):
    """A roster or key advertisement that does not verify."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise RosterError("expected base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise RosterError(f"bad base64 ({exc})") from None


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA384()))


def verify(key: PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def public_key_text(key: PublicKey) -> str:
    """The OpenSSH one-line form (the roster's and the advertisements' name for a node key)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _read(path: Path, what: str) -> bytes:
    return read_key_file(path, what, RosterError)


def load_node_private_key(path: Path) -> PrivateKey:
    """A node authentication key: OpenSSH (as ``fedpriv keys`` writes it) or PEM."""
    data = _read(path, "the node key")
    try:
        key = parse_private_key(data)
    except PassphraseError as exc:
        raise RosterError(f"the node key {path}: {exc}") from None
    except KEY_ERRORS as exc:
        raise RosterError(f"{path} is not a node key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, Ed25519PrivateKey)):
        raise RosterError(f"{path}: node keys must be EC or Ed25519")
    return key


def load_trust_anchor(path: Path) -> PublicKey:
    """The key a roster must be signed by: from a CA certificate or a public key (PEM)."""
    data = _read(path, "the federation trust anchor")
    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise RosterError(f"{path} is not a certificate or public key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, Ed25519PublicKey)):
        raise RosterError(f"{path}: the trust anchor must be an EC or Ed25519 key")
    return key


# ---- the roster ---------------------------------------------------------------------------
def sign_roster(anchor_key: PrivateKey, node_keys: Iterable[PublicKey | str]) -> bytes:
    """A roster of ``node_keys`` signed by the trust anchor's private key."""
    names = sorted({k if isinstance(k, str) else public_key_text(k) for k in node_keys})
    payload = json.dumps({
        "version": _ROSTER_VERSION,
        "issued_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nodes": names,
    }, sort_keys=True).encode()
    return json.dumps({"roster": _b64(payload), "signature": _b64(sign(anchor_key, payload))}).encode()


@dataclass(frozen=True)
class Roster:
    """The verified set of node keys (OpenSSH text) of a federation."""

    nodes: frozenset[str]
    issued_at: str
    digest: str  # SHA-256 of the signed payload

    def __contains__(self, key_text: str) -> bool:
        return key_text in self.nodes


def open_roster(blob: bytes, anchor: PublicKey) -> Roster:
    """Verify a signed roster against the trust anchor (RosterError if it does not verify)."""
    try:
        outer = json.loads(blob)
        payload, signature = _unb64(outer["roster"]), _unb64(outer["signature"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RosterError(f"the roster is malformed ({type(exc).__name__})") from None
    if not verify(anchor, signature, payload):
        raise RosterError("the roster's signature does not verify against this node's trust anchor")
    try:
        inner = json.loads(payload)
        if inner["version"] != _ROSTER_VERSION:
            raise RosterError(f"unknown roster version {inner['version']!r}")
        nodes = frozenset(str(n) for n in inner["nodes"])
        issued = str(inner["issued_at"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RosterError(f"the roster's contents are malformed ({type(exc).__name__})") from None
    return Roster(nodes, issued, hashlib.sha256(payload).hexdigest())


def check_roster_file(path: Path, ca_path: Path, node_keys: list[Path]) -> Roster:
    """The signed node roster at ``path``, verified against the CA certificate, naming every node
    key in ``node_keys`` (RosterError otherwise)."""
    roster = open_roster(_read(path, "node roster"), load_trust_anchor(ca_path))
    for key in node_keys:
        if " ".join(_read(key, "node public key").decode().split()[:2]) not in roster:
            raise RosterError(
                f"node key {key} is not on the roster {path}, so other nodes would refuse its SecAgg+ "
                f"keys; re-sign it where the CA key is: fedpriv keys --out DIR --sign-roster --node-key {key.name}")
    return roster


# ---- key advertisements -------------------------------------------------------------------
def _advert_message(context: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    return b"".join([
        _ADVERT_DOMAIN, hashlib.sha256(context.encode()).digest(), int(node_id).to_bytes(8, "little"),
        hashlib.sha256(pk1).digest(), hashlib.sha256(pk2).digest(),
    ])


def advertise(key: PrivateKey, context: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """The signed advertisement of ``(pk1, pk2)`` by node ``node_id`` in ``context`` (run and
    round), carried in place of ``pk2``."""
    body = {
        "pk2": _b64(pk2),
        "signer": public_key_text(key.public_key()),
        "signature": _b64(sign(key, _advert_message(context, node_id, pk1, pk2))),
    }
    return ADVERT_MAGIC + json.dumps(body, sort_keys=True).encode()


@functools.lru_cache(maxsize=4096)
def _signer_key(text: str) -> PublicKey | None:
    """A roster member's key, parsed once per process (None if it is not an EC or Ed25519 key)."""
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, (ec.EllipticCurvePublicKey, Ed25519PublicKey)) else None


@dataclass(frozen=True)
class Advertisement:
    pk2: bytes
    signer: str


def open_advertisement(blob: bytes, roster: Roster, context: str, node_id: int, pk1: bytes) -> Advertisement:
    """Check that node ``node_id``'s keys were signed in ``context`` by a key on the roster."""
    if not isinstance(blob, bytes) or not blob.startswith(ADVERT_MAGIC):
        raise RosterError(f"node {node_id}'s public keys carry no signed advertisement")
    try:
        body = json.loads(blob[len(ADVERT_MAGIC):])
        pk2, signer, signature = _unb64(body["pk2"]), str(body["signer"]), _unb64(body["signature"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RosterError(f"node {node_id}'s advertisement is malformed ({type(exc).__name__})") from None
    if signer not in roster:
        raise RosterError(f"node {node_id}'s keys are signed by a key that is not on the federation's roster")
    public = _signer_key(signer)
    if public is None:
        raise RosterError(f"node {node_id}'s signer key cannot be read")
    if not verify(
            public, signature, _advert_message(context, node_id, pk1, pk2)):
        raise RosterError(f"node {node_id}'s key advertisement signature does not verify "
                          f"(substituted or replayed keys)")
    return Advertisement(pk2, signer)


# ---- simulated federations ------------------------------------------------------------------
SIM_ANCHOR_KEY = "federation-anchor.key"
SIM_ANCHOR_PUB = "federation-anchor.pub"
SIM_NODE_SECRET = "federation-nodes.secret"  # the simulated nodes' keys are derived from it


def _load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    from fedpriv.common.fileio import create_private

    try:
        create_private(path, make())
    except FileExistsError:
        pass
    return _read(path, "the simulated federation's key")


def simulated_key_name(node_id: int) -> str:
    """What a virtual node's key is derived for: its Flower node id, which the server knows of
    the nodes it samples (and the node of itself)."""
    return f"node-id/{int(node_id)}"


def simulated_node_key(secret_path: Path, name: str) -> Ed25519PrivateKey:
    """Virtual node ``name``'s authentication key (``name``: :func:`simulated_key_name`), derived
    (HKDF-SHA256) from the simulation's node secret: a population of any size costs no file and no
    state until a node trains."""
    secret = _read(secret_path, "the simulated nodes' secret")
    if len(secret) != 32:
        raise RosterError(f"{secret_path} is not a 32-byte secret")
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedpriv simulated node key v1/" + name.encode()).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def simulated_federation(nodes_root: Path) -> Callable[[Iterable[int]], bytes]:
    """A simulation's federation, made the way a real one is: a trust anchor and the nodes' secret
    under ``nodes_root`` (each created once, 0600, then kept), each node's key derived from the
    secret (:func:`simulated_node_key`). Returns what signs a roster: for the virtual nodes of a
    SecAgg+ round (their node ids), the roster of their public keys, signed by the anchor. A
    roster of the round's nodes, not of the whole population, so that a round costs the same at
    100 virtual nodes as at 100,000: every virtual node's key comes from one secret the anchor's
    holder also holds, so a roster of all of them would prove nothing more."""
    def new_anchor() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    anchor = serialization.load_pem_private_key(_load_or_create(nodes_root / SIM_ANCHOR_KEY, new_anchor), None)
    if not isinstance(anchor, Ed25519PrivateKey):
        raise RosterError(f"{nodes_root / SIM_ANCHOR_KEY} is not an Ed25519 key")
    anchor_pub = anchor.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = nodes_root / SIM_ANCHOR_PUB
    if not pub_path.exists() or pub_path.read_bytes() != anchor_pub:
        from fedpriv.common.fileio import write_atomic

        write_atomic(pub_path, anchor_pub)
    secret_path = nodes_root / SIM_NODE_SECRET
    _load_or_create(secret_path, lambda: os.urandom(32))

    def roster_for(node_ids: Iterable[int]) -> bytes:
        return sign_roster(anchor, [simulated_node_key(secret_path, simulated_key_name(n)).public_key()
                                    for n in node_ids])
    return roster_for
