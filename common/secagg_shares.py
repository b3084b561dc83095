"""Shamir sharing for Flower's SecAgg+ without a thread pool per call: fedpriv's replacement for two
Flower functions, for speed only.

Flower 1.42's ``flwr.common.secure_aggregation.crypto.shamir.create_shares`` and
``combine_shares`` split a secret into 16-byte chunks and share each chunk with PyCryptodome's
``Shamir`` (GF(2^128)), on a ``ThreadPoolExecutor`` that they create and shut down on every
call. ``Shamir`` is pure Python, so the pool's threads only take turns on the GIL: starting
them costs more than the chunks do (standalone, a node's 306-byte key: 7.5 ms against 2.9 ms
in one thread; a 32-byte seed: 2.8 ms against 0.4 ms). A SecAgg+ round calls ``create_shares``
twice on every node and ``combine_shares`` once per node on the server, which in a simulation
runs them beside busy client workers, where each thread start waits for the GIL.

:func:`create_shares` and :func:`combine_shares` keep Flower's signatures, share format
(``<4-byte little-endian index><16-byte share of each chunk>...`` of the PKCS#7-padded secret)
and errors, and call the same PyCryptodome ``Shamir.split`` and ``Shamir.combine`` in turn.
Nothing about the sharing, its randomness (``Shamir.split`` draws from the OS) or the
protocol changes; shares made by either side's functions combine with the other's
(``tests/test_secagg.py``).

:func:`common.secagg_masks.install` puts them in place in the two Flower modules that call
them, ``secaggplus_mod`` (nodes share) and ``secaggplus_workflow`` (the server rebuilds).

To drop this module: when Flower's functions no longer start a pool per call, delete it and its
two lines in :func:`common.secagg_masks.install`.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad, unpad

CHUNK = 16  # bytes: Shamir's field GF(2^128)
INDEX = 4  # bytes of a share's index, little-endian, before its chunks


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which rebuild it (Flower's format)."""
    padded = pad(secret, CHUNK)
    shares = [bytearray(index.to_bytes(INDEX, "little", signed=False)) for index in range(1, num + 1)]
    for start in range(0, len(padded), CHUNK):
        for index, share in Shamir.split(threshold, num, padded[start:start + CHUNK], ssss=False):
            shares[index - 1] += share
    return [bytes(share) for share in shares]


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret rebuilt from ``share_list`` (Flower's format); ValueError if they do not
    rebuild one."""
    chunks = (len(share_list[0]) - INDEX) // CHUNK
    indices = [int.from_bytes(share[:INDEX], "little", signed=False) for share in share_list]
    padded = bytearray()
    for chunk in range(chunks):
        start = INDEX + chunk * CHUNK
        padded += Shamir.combine([(index, share[start:start + CHUNK])
                                  for index, share in zip(indices, share_list, strict=True)], ssss=False)
    try:
        return unpad(bytes(padded), CHUNK)
    except ValueError:
        raise ValueError("Failed to combine shares") from None
