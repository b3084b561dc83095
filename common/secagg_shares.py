"""Shamir sharing for Flower's SecAgg+, fast: fedpriv's replacement for two Flower functions, for
speed only.

Flower 1.42's ``flwr.common.secure_aggregation.crypto.shamir.create_shares`` and
``combine_shares`` split a secret into 16-byte chunks and share each chunk with PyCryptodome's
``Shamir`` (GF(2^128)), on a ``ThreadPoolExecutor`` that they create and shut down on every call.
``Shamir`` is pure Python, and slow where it need not be: its field multiplication builds a
128-character string for every bit of a factor, and ``combine`` inverts ``k`` field elements for
every chunk although the Lagrange coefficients depend only on the shares' indices. A SecAgg+
round calls ``create_shares`` twice on every node (a 32-byte seed and a 306-byte key: 23 chunks)
and ``combine_shares`` once per node on the server, serially, between two of the protocol's
message exchanges (about 9 ms a node with ``Shamir``).

This module does the same arithmetic directly on Python integers: PyCryptodome's field (the
polynomial ``x^128 + x^7 + x^2 + x + 1``, a chunk read as a big-endian integer whose least
significant bit is the constant coefficient), its polynomial (``threshold - 1`` coefficients of
16 bytes from the OS CSPRNG, then the chunk as the constant term, evaluated at the indices
``1..num``), and Lagrange interpolation at zero, each coefficient computed once per call. The
share format is Flower's (``<4-byte little-endian index><16-byte share of each chunk>...`` of the
PKCS#7-padded secret), and so are the errors. ``tests/test_secagg_shares.py`` checks it against
PyCryptodome and Flower: the same shares from the same random bytes, shares made by either
side's functions combining with the other's, the same answers to bad share sets, and the field
operations equal to PyCryptodome's ``_Element``'s.

:func:`common.secagg_masks.install` puts :func:`create_shares` and :func:`combine_shares` in place
in the two Flower modules that call them, ``secaggplus_mod`` (nodes share) and
``secaggplus_workflow`` (the server rebuilds).

To drop this module: when Flower's (or PyCryptodome's) sharing costs no more than this, delete it
and its two lines in :func:`common.secagg_masks.install`.
"""

from __future__ import annotations

from Crypto.Util.Padding import pad, unpad

from fedpriv.common.entropy import random_bytes

CHUNK = 16  # bytes: Shamir's field GF(2^128)
INDEX = 4  # bytes of a share's index, little-endian, before its chunks
POLY = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1 (PyCryptodome's _Element.irr_poly)
MASK = (1 << 128) - 1
BAD_CHUNK = "The encoded value must be an integer or a 16 byte string"  # PyCryptodome's words


def _window(a: int) -> list[int]:
    """Carry-less multiples of ``a`` by 0..15: the table :func:`_clmul_table` reads."""
    table = [0, a]
    for i in range(2, 16):
        table.append(table[i >> 1] << 1 if i % 2 == 0 else table[i - 1] ^ a)
    return table


def _clmul_table(table: list[int], b: int) -> int:
    """Carry-less product of the element whose :func:`_window` is ``table`` and ``b``."""
    z = 0
    for shift in range(4 * ((b.bit_length() + 3) // 4) - 4, -1, -4):
        z = (z << 4) ^ table[(b >> shift) & 15]
    return z


def _reduce(z: int) -> int:
    """``z`` modulo :data:`POLY` (``x^128 = x^7 + x^2 + x + 1``)."""
    while z >> 128:
        high = z >> 128
        z = (z & MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def gf_mul(a: int, b: int) -> int:
    """The product of ``a`` and ``b`` in GF(2^128)."""
    if a < b:
        a, b = b, a
    if b < 16:  # an index: a few shifts
        z = 0
        while b:
            if b & 1:
                z ^= a
            a <<= 1
            b >>= 1
        return _reduce(z)
    return _reduce(_clmul_table(_window(a), b))


def gf_inverse(a: int) -> int:
    """The inverse of ``a`` in GF(2^128) (binary extended Euclid); ValueError for zero."""
    if a == 0:
        raise ValueError("Inversion of zero")
    u, v, g1, g2 = a, POLY, 1, 0  # invariants: u = g1 * a and v = g2 * a, modulo POLY
    while u != 1 and v != 1:
        shift = u.bit_length() - v.bit_length()
        if shift < 0:
            u, v, g1, g2, shift = v, u, g2, g1, -shift
        u ^= v << shift
        g1 ^= g2 << shift
    return _reduce(g1 if u == 1 else g2)


def _split(threshold: int, num: int, chunk: bytes, noise: bytes) -> list[int]:
    """The shares of one 16-byte chunk at the indices 1..num, as PyCryptodome's ``Shamir.split``
    makes them: ``threshold - 1`` random coefficients (16 bytes each from ``noise``, OS CSPRNG
    bytes), then the chunk, evaluated by Horner's rule."""
    coefficients = [int.from_bytes(noise[i:i + CHUNK], "big") for i in range(0, len(noise), CHUNK)]
    coefficients.append(int.from_bytes(chunk, "big"))
    shares = []
    for index in range(1, num + 1):
        value = 0
        for coefficient in coefficients:
            value = gf_mul(index, value) ^ coefficient
        shares.append(value)
    return shares


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which rebuild it (Flower's format)."""
    padded = pad(secret, CHUNK)
    shares = [bytearray(index.to_bytes(INDEX, "little", signed=False)) for index in range(1, num + 1)]
    per_chunk = CHUNK * (threshold - 1)
    noise = random_bytes(per_chunk * (len(padded) // CHUNK))  # every chunk's coefficients, one read
    for n, start in enumerate(range(0, len(padded), CHUNK)):
        coefficients = noise[n * per_chunk:(n + 1) * per_chunk]
        for share, value in zip(shares, _split(threshold, num, padded[start:start + CHUNK], coefficients),
                                strict=True):
            share += value.to_bytes(CHUNK, "big")
    return [bytes(share) for share in shares]


def _lagrange_at_zero(indices: list[int]) -> list[int]:
    """Each share's Lagrange coefficient for the value at zero of the polynomial through the
    shares at ``indices`` (addition is XOR in GF(2^128))."""
    coefficients = []
    for j, x_j in enumerate(indices):
        numerator = denominator = 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = gf_mul(numerator, x_m)
                denominator = gf_mul(denominator, x_j ^ x_m)
        coefficients.append(gf_mul(numerator, gf_inverse(denominator)))
    return coefficients


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret rebuilt from ``share_list`` (Flower's format); ValueError if they do not
    rebuild one."""
    chunks = (len(share_list[0]) - INDEX) // CHUNK
    indices = [int.from_bytes(share[:INDEX], "little", signed=False) for share in share_list]
    padded = bytearray()
    if chunks:
        for share in share_list:
            if len(share) < INDEX + chunks * CHUNK:
                raise ValueError(BAD_CHUNK)
        if len(set(indices)) != len(indices):
            raise ValueError("Duplicate share")
        tables = [_window(c) for c in _lagrange_at_zero(indices)]
        for start in range(INDEX, INDEX + chunks * CHUNK, CHUNK):
            value = 0
            for table, share in zip(tables, share_list, strict=True):
                value ^= _clmul_table(table, int.from_bytes(share[start:start + CHUNK], "big"))
            padded += _reduce(value).to_bytes(CHUNK, "big")
    try:
        return unpad(bytes(padded), CHUNK)
    except ValueError:
        raise ValueError("Failed to combine shares") from None
