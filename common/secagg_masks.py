"""SecAgg+ masks from a cryptographic stream cipher: fedpriv's replacement for one Flower function.

Flower 1.42 expands every SecAgg+ seed (each client's self-mask seed and every pairwise key) with
``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``, which XOR-folds the seed to
32 bits and runs numpy's Mersenne Twister on it. A pairwise seed is the base64 text of an HKDF
output, so its fold takes at most 2^28 values: a server that knows the sum and the self masks can
search the pairwise masks and recover an individual update. Its masks come from
``randint(0, M - 1)``, so the value ``M - 1`` never occurs (not uniform over Z_M). Flower tracks
this as issue #7522 ("SecAgg+ uses non-cryptographic PRG for mask generation").

:func:`expand_masks` keeps Flower's signature and draws from ChaCha20 keyed with SHA-256 of the
whole seed (domain-separated), with values exactly uniform over Z_M: M is a power of two (Flower's
workflow requires one, and nodes refuse any other), so the low bits of each 32- or 64-bit word.

:func:`install` puts it in place of ``pseudo_rand_gen`` in the two Flower modules that call it,
``secaggplus_mod`` (clients mask) and ``secaggplus_workflow`` (the server unmasks), so both sides
always use the same generator. Nothing else of Flower's protocol changes. A server announces the
generator in its SecAgg+ setup message (:data:`GENERATOR_KEY`); fedpriv nodes refuse a round
whose server does not (:mod:`clients.secagg_guard`).

To drop this module once Flower ships a cryptographic generator: delete it and its
:func:`install` calls, and let nodes accept Flower's own generator name in the setup check.
``tests/test_secagg_attacks.py`` shows the weakness against Flower's function and its absence
here; it will tell when upstream has changed.
"""

from __future__ import annotations

import hashlib
import importlib
from types import ModuleType
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpriv.common import secagg_shares

GENERATOR = "fedpriv-chacha20-sha256-v1"
GENERATOR_KEY = "fedpriv_mask_generator"  # the setup config key a fedpriv server announces it under
FLOWER_CALLERS = (  # the Flower modules that call pseudo_rand_gen (client masking, server unmasking)
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
_DOMAIN = b"fedpriv secagg+ mask stream v1\x00"
_NONCE = bytes(16)  # each key is used for one stream only: SHA-256 of a fresh secret


def _keystream(seed: bytes, nbytes: int) -> bytes:
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    return Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor().update(bytes(nbytes))


def uniform_mod(seed: bytes, num_range: int, count: int) -> np.ndarray:
    """``count`` values exactly uniform over [0, num_range), from the stream keyed by ``seed``.

    ``num_range`` must be a power of two (Flower's SecAggPlusWorkflow requires it of its
    modulus): the low bits of uniform words are then uniform, with no rejection needed.

    Up to 2^32 (Flower's default modulus) the values stay in the stream's 32-bit unsigned words;
    Flower only adds them to, or subtracts them from, vectors of signed integers (at most 32 bits
    for a quantized update, 64 for a masked one), which numpy does exactly in 64 bits. A copy to
    64-bit integers, what Flower's own function returns, took 3.2 of the 3.8 ms a mask of 1M values
    cost on 2 Xeon cores (allocating 8 MB of fresh memory each time); masking a 1M update with 5
    masks the way Flower's client does took 10.6 ms with it and 6.0 ms without. (Whole rounds of the
    1M MLP with 50 clients, three interleaved pairs: 2.50-2.65 s without it, 2.55-2.79 s with it;
    within this machine's run-to-run spread.) Larger ranges use 64-bit words, made signed (they are
    below 2^63): numpy turns unsigned 64-bit plus signed into floats.
    """
    if num_range < 2 or num_range > 2**63 or num_range & (num_range - 1):
        raise ValueError(f"the mask range must be a power of two in [2, 2^63], got {num_range}")
    word = np.uint32 if num_range <= 2**32 else np.uint64
    raw = np.frombuffer(_keystream(seed, count * np.dtype(word).itemsize), dtype=word)
    if num_range != 2 ** (8 * raw.itemsize):
        raw = raw & word(num_range - 1)
    return raw if word is np.uint32 else raw.astype(np.int64)


def expand_masks(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks of the given shapes, uniform over Z_num_range (the signature of Flower's function)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in dimensions_list]
    flat = uniform_mod(seed, num_range, sum(sizes))
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def install() -> None:
    """Make Flower's SecAgg+ client mod and server workflow expand seeds with :func:`expand_masks`,
    and share and rebuild secrets with :mod:`common.secagg_shares` (idempotent; affects this
    process only). The one place where fedpriv replaces pieces of Flower's SecAgg+."""
    client, server = _flower_modules()
    for module in (client, server):
        module.pseudo_rand_gen = expand_masks
    client.create_shares = secagg_shares.create_shares
    server.combine_shares = secagg_shares.combine_shares


def installed() -> bool:
    """Whether both Flower modules use :func:`expand_masks` and :mod:`common.secagg_shares`."""
    client, server = _flower_modules()
    return (client.pseudo_rand_gen is server.pseudo_rand_gen is expand_masks
            and client.create_shares is secagg_shares.create_shares
            and server.combine_shares is secagg_shares.combine_shares)


def _flower_modules() -> list[ModuleType]:
    # By module path: the packages re-export functions under the same names as the modules.
    return [importlib.import_module(name) for name in FLOWER_CALLERS]
