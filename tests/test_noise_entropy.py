"""Every DP noise path, and the batch sampling, takes its key material from os.urandom.

TensorFlow's own OS seeding -- ``tf.random.Generator.from_non_deterministic_state()``, and the
unseeded ``tf.random.normal`` TF Privacy adds its noise with -- reads 4 bytes of /dev/urandom
into a Mersenne Twister: 32 bits, so one noised update could be searched for its seed. These
tests stand in for ``os.urandom`` with reproducible bytes and show that each path's noise is a
function of those bytes alone (identical bytes, identical noise, whatever TensorFlow's and
numpy's seeds), that it reads 192 fresh bits for every step, and that each of those bits
changes the noise.
"""

from __future__ import annotations

import hashlib
import inspect
import os

import numpy as np
import pytest

from fedpriv.clients.trainer import LocalTrainer
from fedpriv.common import entropy, secagg
from fedpriv.common.config import ClientSection, DPSection, ModelSection
from fedpriv.common.tf_runtime import keras, tf

IMPLEMENTATIONS = ["bookkeeping", "fast", "keras", "vectorized"]
# Stateful random ops that seed themselves from TensorFlow's process-wide 32-bit-seeded source
# when no seed is given (what tf.random.normal, tf.random_normal_initializer and friends build).
LEGACY_RANDOM_OPS = {"RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal",
                     "ParameterizedTruncatedNormal", "RandomGamma", "RandomPoisson", "RandomPoissonV2",
                     "RandomShuffle", "Multinomial", "NonDeterministicInts"}
GENERATOR_DRAW_OPS = {"RngReadAndSkip", "StatelessRandomNormalV2"}  # tf.random.Generator.normal
KEY_TOP_BIT = 8 * entropy.PHILOX_STATE_BYTES - 1  # the last bit of TF Philox's 64-bit key


class FakeUrandom:
    """Stands in for os.urandom: reproducible bytes (SHAKE-256 of a label and the call number),
    optionally with bit ``flip_bit`` flipped in every answer (or only in call ``flip_call``);
    logs the sizes asked for."""

    def __init__(self, label: str, flip_bit: int | None = None, flip_call: int | None = None) -> None:
        self.label, self.flip_bit, self.flip_call, self.sizes = label, flip_bit, flip_call, []

    def __call__(self, n: int) -> bytes:
        call = len(self.sizes)
        out = bytearray(hashlib.shake_256(f"{self.label}/{call}".encode()).digest(n))
        self.sizes.append(n)
        if self.flip_bit is not None and self.flip_call in (None, call) and self.flip_bit < 8 * n:
            out[self.flip_bit // 8] ^= 1 << (self.flip_bit % 8)
        return bytes(out)


def _forbid_32_bit_seeding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_non_deterministic_state seeds from 32 bits")

    monkeypatch.setattr(tf().random.Generator, "from_non_deterministic_state", refuse)


def _trainer(implementation, noise=1.0):
    return LocalTrainer(
        "mlp", ModelSection(mlp_layers=0),
        ClientSection(learning_rate=1.0, batch_size=4, optimizer="sgd", momentum=0.0),
        DPSection(enabled=True, l2_norm_clip=1.0, noise_multiplier=noise, implementation=implementation),
        (8,), 3)


def _batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 8)).astype(np.float32), np.array([0, 1, 2, 1])


def _flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def _step_from(trainer, weights, x, y):
    trainer.model.set_weights(weights)
    trainer.step(x, y)
    return _flat(trainer.model.get_weights())


def _disturb_other_seeds(seed):
    """Move every seed an attacker could guess: TensorFlow's global and op seeds, numpy's and
    Python's, and TensorFlow's process-wide 32-bit-seeded stream (by drawing from it)."""
    keras().utils.set_random_seed(seed)
    tf().random.normal([seed % 7 + 1])
    tf().random.Generator.from_seed(seed).normal([3])


def _graph_op_types(trainer, x, y):
    """Every op type in the graph of the trainer's training step, nested functions included."""
    t = tf()
    spec = (t.TensorSpec([None, *x.shape[1:]], t.float32), t.TensorSpec([None], t.int64))
    graph_def = t.function(trainer.model.train_step).get_concrete_function(spec).graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += function.node_def
    return {node.op for node in nodes}


def test_the_noise_generator_state_is_192_bits_from_os_urandom(monkeypatch):
    _forbid_32_bit_seeding(monkeypatch)
    fake = FakeUrandom("state")
    monkeypatch.setattr(os, "urandom", fake)
    noise = entropy.GaussianNoise()
    assert fake.sizes == [24] and entropy.PHILOX_STATE_BITS == 192
    assert noise.generator.algorithm == tf().random.Algorithm.PHILOX.value
    assert noise.generator.state.numpy().tobytes() == FakeUrandom("state")(24)  # key and counter, all of it
    noise.reseed()
    assert fake.sizes == [24, 24]
    expected = FakeUrandom("state")
    expected(24)
    assert noise.generator.state.numpy().tobytes() == expected(24)


def test_each_of_the_192_state_bits_changes_the_noise(monkeypatch):
    def draw(flip_bit):
        monkeypatch.setattr(os, "urandom", FakeUrandom("bits", flip_bit))
        noise.reseed()
        return noise.add_to([tf().zeros([8])], 1.0)[0].numpy()

    noise = entropy.GaussianNoise()
    base = draw(None)
    assert np.all(base == draw(None))  # the bytes determine the noise...
    same = [bit for bit in range(entropy.PHILOX_STATE_BITS) if np.array_equal(draw(bit), base)]
    assert same == []  # ...and no bit of them is ignored: no 32-bit (or 64-bit) bottleneck


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_dp_sgd_path_draws_its_noise_from_os_urandom_alone(monkeypatch, implementation):
    _forbid_32_bit_seeding(monkeypatch)
    x, y = _batch()
    # Two trainers built under identical seeds (Keras, TensorFlow, numpy, Python) still noise
    # differently: nothing about the noise comes from those seeds.
    keras().utils.set_random_seed(7)
    trainer = _trainer(implementation)
    keras().utils.set_random_seed(7)
    twin = _trainer(implementation)
    start = trainer.model.get_weights()
    assert np.array_equal(_flat(start), _flat(twin.model.get_weights()))
    assert not np.allclose(_step_from(trainer, start, x, y), _step_from(twin, start, x, y), atol=1e-3)

    # With os.urandom replaced by fixed bytes, the step is the same whatever else changes...
    fake = FakeUrandom("step")
    monkeypatch.setattr(os, "urandom", fake)
    first = _step_from(trainer, start, x, y)
    assert fake.sizes == [entropy.PHILOX_STATE_BYTES]  # 192 fresh bits for this step
    _disturb_other_seeds(1)
    monkeypatch.setattr(os, "urandom", FakeUrandom("step"))
    np.testing.assert_allclose(_step_from(trainer, start, x, y), first, atol=1e-6)
    _disturb_other_seeds(2)
    monkeypatch.setattr(os, "urandom", FakeUrandom("step"))
    np.testing.assert_allclose(_step_from(twin, start, x, y), first, atol=1e-6)
    # ...and one flipped bit, in the counter or at the top of the key, changes it.
    for bit in (0, KEY_TOP_BIT):
        monkeypatch.setattr(os, "urandom", FakeUrandom("step", flip_bit=bit))
        assert not np.allclose(_step_from(trainer, start, x, y), first, atol=1e-3)

    # The step's graph holds no unseeded legacy random op; it reads key and counter from the
    # generator's state (RngReadAndSkip) and draws with them (StatelessRandomNormalV2).
    ops = _graph_op_types(trainer, x, y)
    assert not ops & LEGACY_RANDOM_OPS, ops & LEGACY_RANDOM_OPS
    assert GENERATOR_DRAW_OPS <= ops


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_noise_no_random_op_runs(implementation):
    """A noise multiplier of 0 (the test harness's noiseless trainer) removes the noise draw entirely."""
    x, y = _batch()
    trainer = _trainer(implementation, noise=0.0)
    trainer.step(x, y)
    ops = _graph_op_types(trainer, x, y)
    assert not ops & (LEGACY_RANDOM_OPS | GENERATOR_DRAW_OPS)


def test_batch_sampling_is_keyed_by_384_bits_from_os_urandom(monkeypatch):
    fake = FakeUrandom("sampling")
    monkeypatch.setattr(os, "urandom", fake)
    rng = entropy.numpy_generator()
    assert fake.sizes == [16, 32] and entropy.NUMPY_PHILOX_BITS == 384
    expected = FakeUrandom("sampling")
    state = rng.bit_generator.state["state"]
    key = int.from_bytes(expected(16), "little")
    counter = int.from_bytes(expected(32), "little")
    assert [int(k) for k in state["key"]] == [key & (2**64 - 1), key >> 64]
    assert sum(int(c) << (64 * i) for i, c in enumerate(state["counter"])) == counter
    draws = rng.random(64)
    monkeypatch.setattr(os, "urandom", FakeUrandom("sampling"))
    assert np.array_equal(entropy.numpy_generator().random(64), draws)
    for call, bit in ((0, 0), (0, 127), (1, 0), (1, 255)):  # key bits (call 0), counter bits (call 1)
        monkeypatch.setattr(os, "urandom", FakeUrandom("sampling", flip_bit=bit, flip_call=call))
        assert not np.array_equal(entropy.numpy_generator().random(64), draws)


def test_a_round_of_training_is_a_function_of_os_urandom_alone(monkeypatch):
    """Sampling and noise together: the same OS bytes give the same round, other seeds aside."""
    _forbid_32_bit_seeding(monkeypatch)
    trainer = _trainer("bookkeeping")
    x = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    y = np.arange(40) % 3
    start = trainer.model.get_weights()
    rounds = []
    for seed, label in ((1, "round"), (2, "round"), (1, "other round")):
        _disturb_other_seeds(seed)
        fake = FakeUrandom(label)
        monkeypatch.setattr(os, "urandom", fake)
        rounds.append(_flat(trainer.train(start, x, y, schedule_examples=40).weights))
        # The sampler's key and counter, then 192 bits for each (non-empty) step of ceil(40 / 4).
        assert fake.sizes[:2] == [16, 32] and 5 <= len(fake.sizes[2:]) <= 10 and set(fake.sizes[2:]) == {24}
    np.testing.assert_allclose(rounds[0], rounds[1], atol=1e-6)
    assert not np.allclose(rounds[0], rounds[2], atol=1e-3)


def test_user_level_noise_rounding_and_client_sampling_read_os_urandom():
    """fedpriv.common.secagg's samplers (central and distributed user-level noise, randomized rounding,
    the server's client sampling) default to os.urandom and are functions of their byte source."""
    for sampler in (secagg.uniform, secagg.gaussian, secagg.discrete_gaussian, secagg.randomized_round):
        assert inspect.signature(sampler).parameters["random_bytes"].default is os.urandom, sampler
    fake = FakeUrandom("secagg")
    uniform = secagg.uniform(4, fake)
    assert fake.sizes == [32] and np.all((uniform > 0) & (uniform <= 1))  # 64 bits read per draw
    draws = [secagg.gaussian((50,), 1.0, FakeUrandom("g")), secagg.discrete_gaussian((50,), 3.0, FakeUrandom("g")),
             secagg.randomized_round(np.full(50, 0.5), FakeUrandom("g"))]
    again = [secagg.gaussian((50,), 1.0, FakeUrandom("g")), secagg.discrete_gaussian((50,), 3.0, FakeUrandom("g")),
             secagg.randomized_round(np.full(50, 0.5), FakeUrandom("g"))]
    other = [secagg.gaussian((50,), 1.0, FakeUrandom("g", 63)),
             secagg.discrete_gaussian((50,), 3.0, FakeUrandom("g", 63)),
             secagg.randomized_round(np.full(50, 0.5), FakeUrandom("g", 63))]
    for a, b, c in zip(draws, again, other):
        assert np.array_equal(a, b) and not np.array_equal(a, c)
