"""fedpriv's Shamir sharing (common/secagg_shares.py) against PyCryptodome's field and ``Shamir`` and
Flower 1.42's own functions: the same field operations, the same shares from the same random bytes,
the same format both ways, the same answers to bad share sets, fresh randomness."""

from __future__ import annotations

import importlib
import itertools
import os

import pytest
from flwr.common.secure_aggregation.crypto import shamir as flower

from fedpriv.common import secagg_masks, secagg_shares

SECRETS = [b"", b"x", os.urandom(15), os.urandom(16), os.urandom(32), os.urandom(306)]  # 306: a node's key


@pytest.mark.parametrize("secret", SECRETS, ids=lambda s: f"{len(s)}B")
@pytest.mark.parametrize("threshold,num", [(2, 3), (3, 5)])
def test_shares_rebuild_across_flowers_and_fedprivs_functions(secret, threshold, num):
    ours, theirs = secagg_shares.create_shares(secret, threshold, num), flower.create_shares(secret, threshold, num)
    assert [len(s) for s in ours] == [len(s) for s in theirs]  # same layout: index, then one share per chunk
    assert [s[:4] for s in ours] == [s[:4] for s in theirs]
    for subset in list(itertools.combinations(range(num), threshold))[::3]:  # every third subset
        assert flower.combine_shares([ours[i] for i in subset]) == secret
        assert secagg_shares.combine_shares([theirs[i] for i in subset]) == secret
        assert secagg_shares.combine_shares([ours[i] for i in subset]) == secret


def test_a_bad_share_set_gets_flowers_answer():
    secret = os.urandom(32)
    shares = secagg_shares.create_shares(secret, 3, 5)
    tampered = shares[1][:10] + bytes([shares[1][10] ^ 1]) + shares[1][11:]
    for bad in ([shares[0], shares[0], shares[2]],  # the same share twice
                [shares[0], tampered, shares[2]],  # one share altered
                shares[:2]):  # below the threshold
        try:
            expected = ("ok", flower.combine_shares(bad))
        except ValueError as exc:
            expected = ("error", str(exc))
        try:
            got = ("ok", secagg_shares.combine_shares(bad))
        except ValueError as exc:
            got = ("error", str(exc))
        assert got == expected
        assert got != ("ok", secret)


def test_the_field_is_pycryptodomes():
    from Crypto.Protocol.SecretSharing import _Element

    values = [int.from_bytes(os.urandom(16), "big") for _ in range(40)] + [1, 2, 3, 7, 15, 16, 2**127, 2**128 - 1]
    for a, b in zip(values, values[::-1] + values[5:]):
        assert secagg_shares.gf_mul(a, b) == int(_Element(a) * _Element(b))
    for a in values:
        assert secagg_shares.gf_inverse(a) == int(_Element(a).inverse())
        assert secagg_shares.gf_mul(a, secagg_shares.gf_inverse(a)) == 1
    with pytest.raises(ValueError):
        secagg_shares.gf_inverse(0)


@pytest.mark.parametrize("threshold,num", [(2, 3), (3, 5), (4, 7)])
def test_the_same_random_bytes_give_pycryptodomes_shares(monkeypatch, threshold, num):
    """PyCryptodome's Shamir.split and fedpriv's, each fed the same bytes where it reads the OS,
    make the same shares: same coefficients, same polynomial, same indices and encoding."""
    import Crypto.Protocol.SecretSharing as pycryptodome

    from fedpriv.common import entropy

    stream = os.urandom(16 * 64)
    reads = {"theirs": 0, "ours": 0}

    def source(name):
        def read(n):
            start = reads[name]
            reads[name] += n
            return stream[start:start + n]
        return read

    monkeypatch.setattr(pycryptodome, "rng", source("theirs"))
    monkeypatch.setattr(entropy.os, "urandom", source("ours"))
    # One chunk (Flower's pool splits several chunks on threads, which draw in any order).
    for secret in (b"", os.urandom(9), os.urandom(15)):
        reads.update(theirs=0, ours=0)
        assert secagg_shares.create_shares(secret, threshold, num) == flower.create_shares(secret, threshold, num)
        assert reads["ours"] == reads["theirs"] == 16 * (threshold - 1)


def test_every_sharing_is_fresh():
    secret = os.urandom(32)
    first, second = secagg_shares.create_shares(secret, 3, 5), secagg_shares.create_shares(secret, 3, 5)
    assert all(a[4:] != b[4:] for a, b in zip(first, second, strict=True))


def test_flowers_secagg_modules_share_with_fedprivs_functions():
    secagg_masks.install()
    assert secagg_masks.installed()
    client = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert client.create_shares is secagg_shares.create_shares
    assert server.combine_shares is secagg_shares.combine_shares
