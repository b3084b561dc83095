"""Every DP noise path, and the batch sampling, takes its key material from os.urandom.

TensorFlow's own OS seeding -- ``tf.random.Generator.from_non_deterministic_state()``, and the
unseeded ``tf.random.normal`` TF Privacy adds its noise with -- reads 4 bytes of /dev/urandom
into a Mersenne Twister: 32 bits, so one noised update could be searched for its seed. These
tests stand in for ``os.urandom`` with reproducible bytes and show that each path's noise is a
function of those bytes alone (identical bytes, identical noise, whatever TensorFlow's and
numpy's seeds), that every step reads a fresh 384-bit seed, that each of those bits changes the
noise, and that no step's noise is ever used twice (not by a second step, not across a fork).
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
GENERATOR_DRAW_OPS = {"RngReadAndSkip", "RngSkip", "StatelessRandomNormalV2", "StatefulStandardNormalV2",
                      "StatelessRandomUniformV2", "StatelessRandomUniformFullIntV2"}
SEED = entropy.NOISE_SEED_BYTES  # 48: a 256-bit AES key and a 128-bit initial counter


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


def _laid_out(noise, n):
    """Trace a step that noises ``n`` values, so the pool has its size; return the step."""
    t = tf()
    step = t.function(lambda: noise.add_to([t.zeros([n])], 1.0)[0])
    step.get_concrete_function()
    return step


def test_every_step_reads_a_fresh_384_bit_seed_and_its_normals_are_aes_ctr_of_it(monkeypatch):
    _forbid_32_bit_seeding(monkeypatch)
    fake = FakeUrandom("seed")
    monkeypatch.setattr(os, "urandom", fake)
    noise = entropy.GaussianNoise()
    step = _laid_out(noise, 1000)
    assert fake.sizes == [] and noise.size == 1000 and entropy.NOISE_SEED_BITS == 384
    expected = FakeUrandom("seed")
    draws = []
    for _ in range(3):
        noise.refill()
        draws.append(step().numpy())
    # Step 1's seed is read when it is refilled, then each refill reads the next step's seed
    # (its normals are drawn on a background thread while the step trains).
    assert fake.sizes == [SEED] * 4
    seeds = [expected(SEED) for _ in range(3)]
    for got, seed in zip(draws, seeds):
        np.testing.assert_array_equal(got, entropy.standard_normals(1000, seed))
    assert len({d.tobytes() for d in draws}) == 3


def test_standard_normals_use_every_seed_bit_and_are_standard_normal():
    seed = FakeUrandom("bits")(SEED)
    base = entropy.standard_normals(8, seed)
    assert np.array_equal(base, entropy.standard_normals(8, seed))  # the bytes determine the noise...
    same = [bit for bit in range(entropy.NOISE_SEED_BITS)
            if np.array_equal(entropy.standard_normals(8, FakeUrandom("bits", bit)(SEED)), base)]
    assert same == []  # ...and no bit of them is ignored: no 32-bit (or 64-bit) bottleneck
    with pytest.raises(ValueError):
        entropy.standard_normals(8, seed[:32])
    from scipy import stats

    z = entropy.standard_normals(1_000_001).astype(np.float64)  # odd: the last pair is cut in half
    assert z.dtype == np.float64 and len(z) == 1_000_001
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    assert abs(stats.kurtosis(z)) < 0.03 and np.abs(z).max() <= np.sqrt(2 * np.log(2.0**53)) + 1e-4


def test_the_noise_tail_reaches_past_where_24_bit_uniforms_stop():
    """A 24-bit radius uniform would stop the noise at sqrt(2 ln 2^24) = 5.77; the refined tail
    reaches sqrt(2 ln 2^53) = 8.57, and in the refined region the radius keeps its exact law."""
    def crafted(radius_word, extra_word):
        words = np.array([radius_word] * 4 + [0] * 4, dtype=np.uint32)  # angle 0: the radius itself
        return entropy._box_muller(words, np.empty(8, np.float32),
                                   lambda k: np.full(k, extra_word, dtype=np.uint32))[:4]

    np.testing.assert_allclose(crafted(0xFFFFFFFF, 0), np.sqrt(2 * 53 * np.log(2.0)), rtol=1e-6)
    np.testing.assert_allclose(crafted(0xFFFFFFFF, 0xFFFFFFFF), np.sqrt(2 * 24 * np.log(2.0)), rtol=1e-6)
    assert np.all(crafted(0, 0) == 0.0)  # u1 = 1: radius 0, nothing refined
    from scipy import stats

    z = entropy.standard_normals(4_000_000).astype(np.float64)
    squared = z[:2_000_000] ** 2 + z[2_000_000:] ** 2  # each Box-Muller pair's radius, squared
    tail = squared[squared > 2 * np.log(2.0**10)] / 2 - np.log(2.0**10)  # refined: Exp(1) above the cut
    assert 1500 < len(tail) < 2500
    assert stats.kstest(tail, "expon").pvalue > 1e-4


def test_a_step_that_finds_its_noise_used_refuses_to_run():
    noise = entropy.GaussianNoise(prefetch=False)
    step = _laid_out(noise, 16)
    with pytest.raises(tf().errors.InvalidArgumentError, match="DP noise pool already used"):
        step()  # never refilled
    noise.refill()
    first = step().numpy()
    with pytest.raises(tf().errors.InvalidArgumentError, match="DP noise pool already used"):
        step()  # the same pool again
    noise.refill()
    assert not np.array_equal(step().numpy(), first)


def test_normals_drawn_before_a_fork_are_never_used_after_it():
    """A child that inherited its parent's prefetched normals would add the same noise as the
    parent's next step; it draws its own from a seed it reads itself."""
    noise = entropy.GaussianNoise()
    _laid_out(noise, 256)
    noise.refill()
    noise._pending[1].result()  # the next step's normals are drawn, and in memory, at the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, noise._next_normals().tobytes())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = np.frombuffer(pipe.read(), np.float32)
    os.waitpid(pid, 0)
    parent = noise._next_normals()
    assert len(child) == len(parent) == 256 and not np.array_equal(child, parent)


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

    def steps(fake, seed):
        """Three steps from ``start`` by a new trainer, built and run with os.urandom replaced by
        ``fake`` and every other seed moved by ``seed``."""
        monkeypatch.setattr(os, "urandom", fake)
        _disturb_other_seeds(seed)
        fresh = _trainer(implementation)
        return [_step_from(fresh, start, x, y) for _ in range(3)], fake.sizes

    # With os.urandom replaced by fixed bytes, the steps are the same whatever else changes...
    first, sizes = steps(FakeUrandom("step"), 1)
    assert sizes == [SEED] * 4  # a fresh 384-bit seed for each step (and one for the next)
    again, _ = steps(FakeUrandom("step"), 2)
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # ...and one flipped bit, in the AES key or in the counter, changes the step it seeds.
    for call, bit in ((0, 0), (0, 383), (1, 255)):
        flipped, _ = steps(FakeUrandom("step", flip_bit=bit, flip_call=call), 3)
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(flipped[:call], first[:call]))
        assert not np.allclose(flipped[call], first[call], atol=1e-3)

    # The step's graph holds no random op at all: it reads its noise from the pool, after marking
    # the pool used (AssignSubVariableOp, the positive control).
    ops = _graph_op_types(trainer, x, y)
    assert not ops & (LEGACY_RANDOM_OPS | GENERATOR_DRAW_OPS), ops & (LEGACY_RANDOM_OPS | GENERATOR_DRAW_OPS)
    assert "AssignSubVariableOp" in ops


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_noise_no_random_op_runs(implementation):
    """A noise multiplier of 0 (the test harness's noiseless trainer) removes the noise draw entirely."""
    x, y = _batch()
    trainer = _trainer(implementation, noise=0.0)
    trainer.step(x, y)
    ops = _graph_op_types(trainer, x, y)
    assert not ops & (LEGACY_RANDOM_OPS | GENERATOR_DRAW_OPS)
    assert "AssignSubVariableOp" not in ops and trainer.noise.size == 0


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
    x = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    y = np.arange(40) % 3
    rounds = []
    for seed, label in ((1, "round"), (2, "round"), (1, "other round")):
        keras().utils.set_random_seed(11)
        trainer = _trainer("bookkeeping")
        start = trainer.model.get_weights()
        _disturb_other_seeds(seed)
        fake = FakeUrandom(label)
        monkeypatch.setattr(os, "urandom", fake)
        rounds.append(_flat(trainer.train(start, x, y, schedule_examples=40).weights))
        # The sampler's key and counter, then a 384-bit seed for each (non-empty) step of
        # ceil(40 / 4), and one for the step after.
        assert fake.sizes[:2] == [16, 32] and 6 <= len(fake.sizes[2:]) <= 11 and set(fake.sizes[2:]) == {SEED}
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
