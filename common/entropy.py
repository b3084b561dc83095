"""Secret randomness: where every draw that a privacy claim rests on gets its entropy.

A DP guarantee holds only if the adversary cannot predict the noise or the sampling, so every
such draw starts from the operating system's CSPRNG (``os.urandom``) -- never from the run seed,
and never from TensorFlow's own non-deterministic seeding: ``tf.random.Generator.
from_non_deterministic_state()`` and unseeded ops such as ``tf.random.normal`` (what TF Privacy's
optimizers and ``DPSequential`` use) seed from one 4-byte read of /dev/urandom into a
``std::mt19937_64``, so whoever sees one noised update could try all 2^32 seeds and subtract the
noise.

- :class:`GaussianNoise`, the DP-SGD noise of every implementation (book-keeping, TF Privacy's
  fast clipping and its DP optimizers, see :mod:`clients.dp_noise`): TensorFlow's Philox
  generator (Philox4x32-10, the algorithm TF Privacy's ops use) whose whole state -- 128-bit
  counter and 64-bit key, :data:`PHILOX_STATE_BITS` = 192 bits -- comes from ``os.urandom``, and
  is replaced by 192 fresh bits before every training step (:meth:`GaussianNoise.reseed`).
  192 bits is all the state Philox4x32 has; 256 bits cannot be reached with it.
- :func:`numpy_generator`, Poisson batch sampling: numpy's Philox4x64-10 with its 128-bit key and
  256-bit counter (:data:`NUMPY_PHILOX_BITS` = 384 bits) from ``os.urandom``, a new one per round.
- User-level noise (central and distributed), randomized rounding and client sampling read
  ``os.urandom`` directly (:mod:`common.secagg`).

:func:`random_bytes` looks ``os.urandom`` up when called, so a test can intercept the source.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

PHILOX_STATE_BYTES = 24  # TensorFlow's Philox state: counter (2 x 64 bits), then key (64 bits)
PHILOX_STATE_BITS = 8 * PHILOX_STATE_BYTES
NUMPY_PHILOX_KEY_BYTES = 16
NUMPY_PHILOX_COUNTER_BYTES = 32
NUMPY_PHILOX_BITS = 8 * (NUMPY_PHILOX_KEY_BYTES + NUMPY_PHILOX_COUNTER_BYTES)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def philox_state() -> np.ndarray:
    """A whole TensorFlow Philox state (counter low, counter high, key): 192 bits from the OS."""
    return np.frombuffer(random_bytes(PHILOX_STATE_BYTES), dtype=np.int64).copy()


class GaussianNoise:
    """Gaussian noise for DP-SGD from a Philox generator whose every state bit is OS entropy.

    Create it eagerly (outside ``tf.function``); :meth:`add_to` works in traced code. The
    generator's state is a ``tf.Variable``: each draw advances its counter, and :meth:`reseed`
    (called eagerly before each step, one small assignment) replaces key and counter with fresh
    bytes, so each step's noise is a function of 192 bits no other step shares.
    """

    def __init__(self) -> None:
        from fedpriv.common.tf_runtime import tf

        t = tf()
        self.generator = t.random.Generator.from_state(philox_state(), alg=t.random.Algorithm.PHILOX)

    def reseed(self) -> None:
        """Replace the whole generator state (key and counter) with 192 fresh bits from the OS."""
        from fedpriv.common.tf_runtime import tf

        # The raw op: a third of the eager overhead of Variable.assign, per training step.
        tf().raw_ops.AssignVariableOp(resource=self.generator.state.handle, value=philox_state())

    def add_to(self, tensors: Sequence[Any], stddev: Any) -> list[Any]:
        """Each tensor plus its own independent N(0, stddev^2) noise (``stddev`` may be a tensor)."""
        from fedpriv.common.tf_runtime import tf

        t = tf()
        return [x + self.generator.normal(t.shape(x), stddev=stddev, dtype=x.dtype) for x in tensors]


def numpy_generator() -> np.random.Generator:
    """A numpy generator for secret draws: Philox4x64-10 keyed (128 bits) and started at a
    counter (256 bits) both read from the OS."""
    key = int.from_bytes(random_bytes(NUMPY_PHILOX_KEY_BYTES), "little")
    counter = int.from_bytes(random_bytes(NUMPY_PHILOX_COUNTER_BYTES), "little")
    return np.random.Generator(np.random.Philox(key=key, counter=counter))
