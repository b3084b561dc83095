"""Conv2D fast clipping: per-example gradient norms equal the exact ones, computed one by one."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.clients.conv_clipping import layer_registry, use_ghost_norm
from fedpriv.common.tf_runtime import keras, tf


def exact_norms(model, x, y, loss_fn, microbatches=None):
    """Each example's gradient norm, by a separate backward pass; with microbatches, the norm of
    each microbatch's mean loss gradient (TF Privacy's convention for microbatches)."""
    t = tf()
    groups = np.split(np.arange(len(x)), microbatches) if microbatches else [[i] for i in range(len(x))]
    norms = []
    for idx in groups:
        with t.GradientTape() as tape:
            loss = t.reduce_mean(loss_fn(y[idx], model(x[idx])))
        grads = tape.gradient(loss, model.trainable_variables)
        norms.append(np.sqrt(sum(float(t.reduce_sum(t.square(g))) for g in grads)))
    return np.array(norms)


def fast_norms(model, x, y, loss_fn, microbatches=None):
    from tensorflow_privacy.privacy.fast_gradient_clipping.clip_grads import compute_gradient_norms

    def per_example_loss(y_true, y_pred, weights=None):
        return loss_fn(y_true, y_pred)

    return compute_gradient_norms(model, layer_registry(), x, y, per_example_loss_fn=per_example_loss,
                                  num_microbatches=microbatches).numpy()


CASES = {
    "valid, bias, tanh": dict(filters=4, kernel_size=3, activation="tanh"),
    "same padding, stride 2": dict(filters=5, kernel_size=3, strides=2, padding="same"),
    "dilation 2, no bias": dict(filters=3, kernel_size=(3, 2), dilation_rate=2, use_bias=False),
    "even kernel, same padding (uneven pads)": dict(filters=4, kernel_size=(2, 4), padding="same"),
    "strides (2, 3), same padding, kernel 4": dict(filters=4, kernel_size=4, strides=(2, 3), padding="same"),
    "dilation 2, same padding": dict(filters=3, kernel_size=3, dilation_rate=(2, 1), padding="same"),
    "1x1, many channels (ghost)": dict(filters=64, kernel_size=1),
    "wide kernel, many channels (ghost)": dict(filters=48, kernel_size=5, padding="valid"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_norms_match_exact_per_example_norms(case, dtype):
    k = keras()
    k.utils.set_random_seed(1)
    model = k.Sequential([
        k.layers.InputLayer(input_shape=(9, 9, 3), dtype=dtype),
        k.layers.Conv2D(**CASES[case], dtype=dtype),
        k.layers.Conv2D(6, 3, padding="same", activation="relu", dtype=dtype),
        k.layers.Flatten(dtype=dtype),
        k.layers.Dense(4, dtype=dtype),
    ])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 9, 9, 3)).astype(dtype)
    y = rng.integers(0, 4, size=8)
    loss_fn = k.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    exact = exact_norms(model, x, y, loss_fn)
    fast = fast_norms(model, x, y, loss_fn)
    tolerance = 1e-9 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(fast, exact, rtol=tolerance)
    for microbatches in (2, 4):
        np.testing.assert_allclose(fast_norms(model, x, y, loss_fn, microbatches),
                                   exact_norms(model, x, y, loss_fn, microbatches), rtol=tolerance)


def test_the_seed_cnn_takes_the_fast_path_with_exact_norms():
    from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils

    from fedpriv.common.config import ModelSection
    from fedpriv.common.models import build_layers

    k = keras()
    k.utils.set_random_seed(2)
    model = k.Sequential(build_layers("cnn", ModelSection(), (28, 28, 1), 10))
    assert gradient_clipping_utils.all_trainable_layers_are_registered(model, layer_registry())
    rng = np.random.default_rng(3)
    x = rng.random(size=(6, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=6)
    loss_fn = k.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    np.testing.assert_allclose(fast_norms(model, x, y, loss_fn), exact_norms(model, x, y, loss_fn), rtol=1e-5)


def test_ghost_form_is_chosen_where_it_is_cheaper():
    assert not use_ghost_norm(26 * 26, 9, 32)   # the seed CNN's first conv: many positions
    assert use_ghost_norm(3 * 3, 576, 64)        # its last conv: few positions, many channels


@pytest.mark.parametrize("channels", [3, 1])  # one input channel takes its own product (grey images)
@pytest.mark.parametrize("case", [c for c in CASES if "ghost" not in c])
def test_per_example_kernel_gradients_are_each_examples_own(case, channels):
    """What book-keeping clips and sums (clients/bk_clipping.py): every example's kernel gradient,
    against a backward pass of that example alone."""
    from fedpriv.clients.conv_clipping import per_example_kernel_grads

    k, t = keras(), tf()
    k.utils.set_random_seed(2)
    layer = k.layers.Conv2D(**CASES[case], dtype="float64")
    x = t.constant(np.random.default_rng(3).normal(size=(5, 9, 9, channels)))
    target = t.constant(np.random.default_rng(4).normal(size=layer.compute_output_shape(x.shape)))
    layer.activation = None
    with t.GradientTape() as tape:
        out = layer(x)
        loss = t.reduce_sum(out * target)  # the output gradient is ``target``
    result = per_example_kernel_grads(layer, x, tape.gradient(loss, out))
    assert result is not None
    per, bias = result
    assert per.shape == (5, *layer.kernel.shape)
    assert (bias is not None) == (channels == 1 and layer.use_bias)  # the one-channel product gives it
    for i in range(5):
        with t.GradientTape() as tape:
            own = t.reduce_sum(layer(x[i:i + 1]) * target[i:i + 1])
        own_grads = tape.gradient(own, layer.trainable_weights)  # kernel, then bias if any
        np.testing.assert_allclose(per[i].numpy(), own_grads[0].numpy(), rtol=1e-9, atol=1e-12)
        if bias is not None:
            np.testing.assert_allclose(bias[i].numpy(), own_grads[1].numpy(), rtol=1e-9, atol=1e-12)
