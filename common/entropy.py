"""Secret randomness: where every draw that a privacy claim rests on gets its entropy.

A DP guarantee holds only if the adversary cannot predict the noise or the sampling, so every
such draw starts from the operating system's CSPRNG (``os.urandom``) -- never from the run seed,
and never from TensorFlow's own non-deterministic seeding: ``tf.random.Generator.
from_non_deterministic_state()`` and unseeded ops such as ``tf.random.normal`` (what TF Privacy's
optimizers and ``DPSequential`` use) seed from one 4-byte read of /dev/urandom into a
``std::mt19937_64``, so whoever sees one noised update could try all 2^32 seeds and subtract the
noise.

- :class:`GaussianNoise`, the DP-SGD noise of every implementation (book-keeping, TF Privacy's
  fast clipping and its DP optimizers, see :mod:`clients.dp_noise`): for each training step, a
  fresh AES-256 key and 128-bit initial counter (:data:`NOISE_SEED_BITS` = 384 bits) from
  ``os.urandom``, and the step's standard normals from that AES-CTR keystream by Box-Muller
  (:func:`standard_normals`). The step's graph reads them from a pool that is refilled before
  every step and refuses to run on a pool it has already used (:meth:`GaussianNoise.refill`).
- :func:`numpy_generator`, Poisson batch sampling: numpy's Philox4x64-10 with its 128-bit key and
  256-bit counter (:data:`NUMPY_PHILOX_BITS` = 384 bits) from ``os.urandom``, a new one per round.
- User-level noise (central and distributed), randomized rounding and client sampling read
  ``os.urandom`` directly (:mod:`common.secagg`).

:func:`random_bytes` looks ``os.urandom`` up when called, so a test can intercept the source.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np

NOISE_KEY_BYTES = 32  # AES-256
NOISE_COUNTER_BYTES = 16  # CTR mode's initial counter block
NOISE_SEED_BYTES = NOISE_KEY_BYTES + NOISE_COUNTER_BYTES
NOISE_SEED_BITS = 8 * NOISE_SEED_BYTES
UNIFORM_BITS = 24  # float32 uniforms on a grid of 2^-24, as exact as float32 holds them
TAIL_REFINE = 2.0**-10  # radius uniforms below this get TAIL_EXTRA_BITS more (standard_normals)
TAIL_EXTRA_BITS = 29  # 24 + 29 = 53 bits: the radius reaches sqrt(2 ln 2^53), about 8.57
NUMPY_PHILOX_KEY_BYTES = 16
NUMPY_PHILOX_COUNTER_BYTES = 32
NUMPY_PHILOX_BITS = 8 * (NUMPY_PHILOX_KEY_BYTES + NUMPY_PHILOX_COUNTER_BYTES)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def standard_normals(n: int, seed: bytes | None = None) -> np.ndarray:
    """``n`` independent N(0, 1) draws (float32) from a cryptographically secure generator.

    ``seed`` (:data:`NOISE_SEED_BYTES` bytes; fresh from the OS when None) keys AES-256 in CTR mode,
    whose keystream gives two 32-bit words per pair of draws; their top :data:`UNIFORM_BITS` bits
    make uniforms ``u1`` in (0, 1] and ``u2`` in [0, 1), and Box-Muller turns each pair into
    ``sqrt(-2 ln u1) cos(2 pi u2)`` and ``sqrt(-2 ln u1) sin(2 pi u2)``.

    **The tail.** With 24-bit ``u1`` the radius would stop at ``sqrt(2 ln 2^24)``, about 5.77
    (where TensorFlow's own Philox normals stop), and a noise vector whose support ends there lets
    a shifted mean be told apart: for a clipped gradient of norm C spread over d coordinates, an
    output impossible without it has probability about ``2^-24 * 5.77 * sqrt(d/2) / (pi z)`` per
    step (2e-5 for the 118,282-parameter MLP at z = 1.2: more than a typical delta). So every
    ``u1`` below :data:`TAIL_REFINE` (one draw in 1,024) is refined with :data:`TAIL_EXTRA_BITS`
    more bits from the continued keystream, to a uniform on a grid of ``2^-53``, and its radius
    computed in float64: the radius then reaches ``sqrt(2 ln 2^53)``, about 8.57, and that term
    falls below 1e-13. (Floating-point outputs remain discrete, as in every float32 DP-SGD
    implementation: Mironov 2012.) On two CPU cores this costs about 5 ns a draw, the keystream a
    fifth of it."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = random_bytes(NOISE_SEED_BYTES) if seed is None else seed
    if len(seed) != NOISE_SEED_BYTES:
        raise ValueError(f"a noise seed is {NOISE_SEED_BYTES} bytes, not {len(seed)}")
    half = (n + 1) // 2
    cipher = Cipher(algorithms.AES(seed[:NOISE_KEY_BYTES]), modes.CTR(seed[NOISE_KEY_BYTES:]))
    encryptor = cipher.encryptor()
    zeros, keystream, uniforms = _workspace(half)
    # (into buffers this thread keeps: fresh ones would cost more in page faults than the draws,
    # and update() returning bytes five times the encryption)
    encryptor.update_into(zeros, keystream)

    def more(count: int) -> np.ndarray:  # the keystream continued
        return np.frombuffer(encryptor.update(bytes(4 * count)), dtype=np.uint32)

    return _box_muller(keystream[: 8 * half].view(np.uint32), uniforms, more)[:n]


def _box_muller(words: np.ndarray, uniforms: np.ndarray, more: Any) -> np.ndarray:
    """Box-Muller on ``words`` (2 * half random 32-bit words, overwritten; the first half make
    the radii), through the float32 buffer ``uniforms``; ``more(k)`` gives k further random words
    for the radii refined in the tail (see :func:`standard_normals`)."""
    half = len(words) // 2
    np.right_shift(words, np.uint32(32 - UNIFORM_BITS), out=words)
    # u1 = 1 - k 2^-24 for the radius words: the pairs whose u1 is below TAIL_REFINE
    tail = np.flatnonzero(words[:half] >= np.uint32(2**UNIFORM_BITS - TAIL_REFINE * 2**UNIFORM_BITS))
    steps_from_top = (2**UNIFORM_BITS - words[tail].astype(np.int64))  # u1 = steps_from_top * 2^-24
    np.multiply(words, np.float32(2.0**-UNIFORM_BITS), out=uniforms, dtype=np.float32, casting="unsafe")
    radius, angle = uniforms[:half], uniforms[half:]
    np.subtract(np.float32(1.0), radius, out=radius)  # (0, 1]: the logarithm is finite
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    if len(tail):
        # u1 was in ((k - 1) 2^-24, k 2^-24]: place it there on a 2^-53 grid, with fresh bits
        extra = (more(len(tail)) >> np.uint32(32 - TAIL_EXTRA_BITS)).astype(np.int64)
        fine = ((steps_from_top - 1) * 2**TAIL_EXTRA_BITS + extra + 1) * 2.0**-(UNIFORM_BITS + TAIL_EXTRA_BITS)
        radius[tail] = np.sqrt(-2.0 * np.log(fine)).astype(np.float32)
    angle *= np.float32(2.0 * np.pi)
    out = np.empty(2 * half, dtype=np.float32)
    np.cos(angle, out=out[:half])
    np.sin(angle, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out


def _normals_tensor(n: int, seed: bytes) -> Any:
    """:func:`standard_normals` as a TensorFlow tensor, made on the thread that draws them (the
    copy into a tensor would otherwise take the step's own thread 0.03-0.07 ms for the MLP's
    118,282 normals)."""
    from fedpriv.common.tf_runtime import tf

    return tf().constant(standard_normals(n, seed))


_WORKSPACE = threading.local()


def _workspace(half: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """This thread's buffers for :func:`standard_normals` of ``2 * half`` draws: the zeros CTR
    mode encrypts (never written), the keystream (with the block of slack ``update_into`` asks
    for) and the uniforms."""
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None or len(buffers[2]) != 2 * half:
        buffers = _WORKSPACE.buffers = (bytes(8 * half), np.empty(8 * half + 15, dtype=np.uint8),
                                        np.empty(2 * half, np.float32))
    return buffers


class GaussianNoise:
    """DP-SGD noise: each training step adds standard normals that no other step shares.

    Create it eagerly; :meth:`add_to` works in traced code and eagerly. A traced step reads its
    noise from a pool (a ``tf.Variable``) laid out at trace time, one slice per noised tensor, so
    the draw itself costs the step nothing. :meth:`refill` must run before every step: it puts
    :func:`standard_normals` from a fresh 384-bit seed in the pool and marks it unused. The step
    marks it used before reading it, and fails (``InvalidArgumentError``, "DP noise pool already
    used") before any gradient is applied if it was already used: the same noise twice would
    cancel in the difference of two updates.

    With ``prefetch`` (the default), :meth:`refill` reads the next step's seed from the OS at once
    and draws that step's normals on a background thread while the current step trains. A forked
    child never uses normals drawn before the fork (its parent could use the same ones): it draws
    its own, from a seed it reads itself.
    """

    def __init__(self, prefetch: bool = True) -> None:
        from fedpriv.common.tf_runtime import tf

        t = tf()
        self.pool = t.Variable(np.zeros(0, np.float32), shape=t.TensorShape([None]), trainable=False,
                               name="dp_noise_pool")
        self.unused = t.Variable(np.int64(0), trainable=False, name="dp_noise_unused")
        self._one = t.constant(1, t.int64)  # made once: converting a numpy scalar costs more than the copy
        self.size = 0  # the most normals one traced step reads (known once a step is traced)
        self.prefetch = prefetch
        self._graphs: dict[Any, list[Any]] = {}  # traced graph -> [its checked pool read, next offset]
        self._owner = os.getpid()  # the process the prefetched normals and their thread belong to
        self._pending: tuple[int, Any] | None = None  # (size, future of the next step's normals)
        self._executor: Any = None

    def refill(self) -> None:
        """Put fresh normals in the pool for the next step (call it eagerly, before each step)."""
        from fedpriv.common.tf_runtime import tf

        if self.size == 0:  # no traced step adds noise (yet): a step traced later finds the pool used
            return
        t = tf()
        t.raw_ops.AssignVariableOp(resource=self.pool.handle, value=self._next_normals())
        t.raw_ops.AssignVariableOp(resource=self.unused.handle, value=self._one)

    def _next_normals(self) -> Any:
        """The next step's normals: the tensor the prefetch thread made, else an array drawn on
        this thread (the first step, a new size, or the first step of a forked child)."""
        if self._owner != os.getpid():  # a forked child: nothing drawn or started before the fork is its own
            self._owner, self._pending, self._executor = os.getpid(), None, None
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == self.size:
            normals = pending[1].result()
        else:  # the first step, or a new size
            normals = standard_normals(self.size)
        if self.prefetch:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(1, thread_name_prefix="fedpriv-noise")
            seed = random_bytes(NOISE_SEED_BYTES)
            self._pending = (self.size, self._executor.submit(_normals_tensor, self.size, seed))
        return normals

    def add_to(self, tensors: Sequence[Any], stddev: Any) -> list[Any]:
        """Each tensor plus its own independent N(0, stddev^2) noise (``stddev`` may be a tensor).
        In a traced function the tensors' shapes must be static (gradients of variables are)."""
        from fedpriv.common.tf_runtime import tf

        t = tf()
        if t.executing_eagerly():
            return [x + t.cast(stddev * standard_normals(int(np.prod(x.shape))).reshape(x.shape), x.dtype)
                    for x in tensors]
        graph = t.compat.v1.get_default_graph()
        if graph not in self._graphs:
            self._graphs[graph] = [self._checked_pool(), 0]
        entry = self._graphs[graph]
        out = []
        for x in tensors:
            if not x.shape.is_fully_defined():
                raise ValueError(f"DP noise needs a static shape, got {x.shape}")
            n = x.shape.num_elements()
            noise = t.reshape(entry[0][entry[1]: entry[1] + n], x.shape)
            out.append(x + t.cast(stddev, x.dtype) * t.cast(noise, x.dtype))
            entry[1] += n
        self.size = max(self.size, entry[1])
        return out

    def _checked_pool(self) -> Any:
        """The pool's value, read only after the step has marked it used (and failed if it was)."""
        from fedpriv.common.tf_runtime import tf

        t = tf()
        fresh = self.unused.assign_sub(1, read_value=True)
        check = t.debugging.Assert(t.equal(fresh, 0), ["DP noise pool already used: refill before each step"])
        with t.control_dependencies([check]):
            return t.identity(self.pool.read_value())


def numpy_generator() -> np.random.Generator:
    """A numpy generator for secret draws: Philox4x64-10 keyed (128 bits) and started at a
    counter (256 bits) both read from the OS."""
    key = int.from_bytes(random_bytes(NUMPY_PHILOX_KEY_BYTES), "little")
    counter = int.from_bytes(random_bytes(NUMPY_PHILOX_COUNTER_BYTES), "little")
    return np.random.Generator(np.random.Philox(key=key, counter=counter))
