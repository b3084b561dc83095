"""Book-keeping DP-SGD computes exactly the clipped mean gradient, and adds the right noise."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.clients import bk_clipping
from fedpriv.common.config import ModelSection
from fedpriv.common.models import build_layers
from fedpriv.common.tf_runtime import keras, tf


def exact_clipped_mean(model, x, y, clip):
    """(1/b) sum_i clip(grad_i), with each example's gradient from its own backward pass."""
    t = tf()
    loss_fn = keras().losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    total = None
    for i in range(len(x)):
        with t.GradientTape() as tape:
            loss = t.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1])))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum(float(np.sum(g ** 2)) for g in grads))
        factor = min(1.0, clip / norm)
        grads = [g * factor for g in grads]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / len(x) for g in total]


def small_cnn():
    k = keras()
    return [k.layers.InputLayer(input_shape=(10, 10, 2)),
            k.layers.Conv2D(4, 3, activation="tanh"),
            k.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
            k.layers.MaxPooling2D(2),
            k.layers.Conv2D(16, 1, use_bias=False),
            k.layers.Flatten(),
            k.layers.Dense(8, activation="tanh"),
            k.layers.Dense(3)]


@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])  # all clipped, some, none
def test_gradients_equal_exact_per_example_clipping(clip):
    k = keras()
    k.utils.set_random_seed(5)
    model = bk_clipping.make_model(small_cnn(), l2_norm_clip=clip, noise_multiplier=0.0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 10, 10, 2)).astype("float32")
    y = rng.integers(0, 3, size=7)
    grads, losses = model.dp_gradients(tf().constant(x), tf().constant(y))
    expected = exact_clipped_mean(model, x, y, clip)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)
    assert losses.shape == (7,)


def test_seed_models_train_through_keras_and_noise_has_the_right_scale():
    k = keras()
    layers = build_layers("cnn", ModelSection(), (28, 28, 1), 10)
    assert bk_clipping.supported(layers)
    model = bk_clipping.make_model(layers, l2_norm_clip=1.0, noise_multiplier=2.0)
    model.compile(optimizer=k.optimizers.legacy.SGD(0.1), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(2).random((16, 28, 28, 1)).astype("float32")
    y = np.arange(16) % 10
    # Keras's own train step, compiled: traced once (laying out the noise pool), then refilled and run.
    t = tf()
    step = t.function(lambda xb, yb: model.train_step((xb, yb))["loss"])
    step.get_concrete_function(t.TensorSpec([None, 28, 28, 1], t.float32), t.TensorSpec([None], t.int64))
    model.dp_noise.refill()
    assert np.isfinite(float(step(x, y)))
    # Run again without a refill, the step refuses before it applies anything: its noise is spent.
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(t.errors.InvalidArgumentError, match="DP noise pool already used"):
        step(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # Two draws at the same weights differ by noise alone: std sqrt(2) * z * C / b per coordinate.
    a, _ = model.dp_gradients(tf().constant(x), tf().constant(y))
    b, _ = model.dp_gradients(tf().constant(x), tf().constant(y))
    diff = np.concatenate([(p - q).numpy().ravel() for p, q in zip(a, b)])
    assert diff.std() == pytest.approx(np.sqrt(2) * 2.0 * 1.0 / 16, rel=0.02)
    # The same inside a compiled step (a fresh pool every call), and no two variables share noise.
    compiled = tf().function(model.dp_gradients)
    compiled.get_concrete_function(tf().constant(x), tf().constant(y))
    model.dp_noise.refill()
    c, _ = compiled(tf().constant(x), tf().constant(y))
    model.dp_noise.refill()
    d, _ = compiled(tf().constant(x), tf().constant(y))
    diffs = [(p - q).numpy().ravel() for p, q in zip(c, d)]
    assert np.concatenate(diffs).std() == pytest.approx(np.sqrt(2) * 2.0 * 1.0 / 16, rel=0.02)
    first, second = sorted(diffs, key=len)[-2:]  # the two largest variables
    n = min(len(first), len(second))
    assert abs(np.corrcoef(first[:n], second[:n])[0, 1]) < 5 / np.sqrt(n)


def test_unsupported_layers_are_refused():
    k = keras()
    layers = [k.layers.InputLayer(input_shape=(4,)), k.layers.BatchNormalization(), k.layers.Dense(2)]
    assert not bk_clipping.supported(layers)
    with pytest.raises(NotImplementedError):
        bk_clipping.make_model(layers, 1.0, 1.0)
