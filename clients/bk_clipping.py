"""Book-keeping DP-SGD: per-example clipping at about the cost of one ordinary training step.

TF Privacy's fast clipping (``DPSequential``) runs the model twice per step: one forward and
backward pass to get every example's gradient norm (ghost norms, layer by layer), then another
forward and backward pass on the loss reweighted by the clip factors. Book-keeping (Bu et al.
2023, "Differentially private optimization on large model at small cost") keeps what the first
pass already computed -- each trainable layer's input and the gradient of the loss with respect
to its pre-activation output -- and builds the clipped gradient from them directly:

    clipped kernel gradient = sum_i w_i * grad_i = (layer input)^T (w * output gradient)

which is exactly the weight gradient an ordinary backward pass computes, with the output gradient
scaled per example. So one forward pass, one backward pass to the layer outputs, the per-example
norms, and one weight-gradient contraction per layer.

The step is the same mechanism as DPSequential's: each example's gradient of its own loss is
clipped to ``l2_norm_clip`` (factor ``min(1, C / norm)``), the clipped gradients are summed,
Gaussian noise of standard deviation ``noise_multiplier * C`` is added to the sum (normals from
AES-256-CTR under a fresh 384-bit ``os.urandom`` seed every step:
:class:`common.entropy.GaussianNoise`), and the result is divided by the batch size.

Conv2D layers where it is cheaper (many output positions, a kernel of at most 65,536 weights)
keep each example's kernel gradient, one batched product of its patch matrix and its output
gradient (:func:`clients.conv_clipping.per_example_kernel_grads`): its squared
sum is the norm, and its clip-weighted sum over the batch is the layer's gradient, with no second
pass through the layer.
Supported trainable layers: ``Dense`` on flat inputs and ``Conv2D`` (channels last); any other
makes :func:`supported` false, and the trainer uses DPSequential instead.
"""

from __future__ import annotations

import functools
from typing import Any

from fedpriv.clients.conv_clipping import conv2d_squared_norms, per_example_kernel_grads, squared_norms
from fedpriv.common.entropy import GaussianNoise
from fedpriv.common.tf_runtime import keras, tf


def _layer_kind(layer: Any) -> str | None:
    """'dense', 'conv2d', 'none' (nothing to train) or None (no book-keeping rule)."""
    k = keras()
    if type(layer) is k.layers.Dense:
        return "dense"
    if type(layer) is k.layers.Conv2D and layer.data_format == "channels_last" and layer.groups == 1:
        return "conv2d"
    weightless = (k.layers.InputLayer, k.layers.Flatten, k.layers.MaxPooling2D, k.layers.AveragePooling2D,
                  k.layers.Activation, k.layers.Dropout, k.layers.Reshape)
    if (layer.built and not layer.weights) or type(layer) in weightless:
        return "none"
    return None


def supported(layers: list[Any]) -> bool:
    """Whether every trainable layer has a book-keeping rule (Dense on flat input, Conv2D)."""
    return all(_layer_kind(layer) is not None for layer in layers)


def _dense_squared_norms(layer: Any, x: Any, g: Any) -> Any:
    g2 = squared_norms(g, 1)
    squared = squared_norms(x, 1) * g2  # ||x_i g_i^T||_F^2 = ||x_i||^2 ||g_i||^2
    return squared + g2 if layer.use_bias else squared


def _dense_grads(layer: Any, x: Any, wg: Any) -> list[Any]:
    t = tf()
    grads = [t.matmul(x, wg, transpose_a=True)]
    return grads + [t.reduce_sum(wg, axis=0)] if layer.use_bias else grads


def _conv_grads(layer: Any, x: Any, wg: Any) -> list[Any]:
    t = tf()
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    kernel = t.compat.v1.nn.conv2d_backprop_filter(
        x, t.shape(layer.kernel), wg, strides=[1, sh, sw, 1], padding=layer.padding.upper(),
        dilations=[1, dh, dw, 1])
    return [kernel, t.reduce_sum(wg, axis=[0, 1, 2])] if layer.use_bias else [kernel]


def _per_example_bias(per: tuple[Any, Any], g: Any) -> Any:
    """Each example's bias gradient: from the kernel product where it gave one, else the output
    gradient ``g`` summed over positions."""
    return per[1] if per[1] is not None else tf().reduce_sum(g, axis=[1, 2])


def _per_example_squared_norms(layer: Any, per: tuple[Any, Any], g: Any) -> Any:
    """Squared norms from per-example kernel (and bias) gradients ``per``."""
    t = tf()
    squared = squared_norms(t.reshape(per[0], [t.shape(per[0])[0], -1]), 1)
    if layer.use_bias:
        squared += squared_norms(_per_example_bias(per, g), 1)
    return squared


def _clipped_sums(layer: Any, per: tuple[Any, Any], g: Any, clip: Any) -> list[Any]:
    """The clipped kernel (and bias) gradient summed over the batch: sum_i clip_i * grad_i."""
    t = tf()
    kernel = t.tensordot(clip, per[0], axes=1)
    return [kernel, t.tensordot(clip, _per_example_bias(per, g), axes=1)] if layer.use_bias else [kernel]


@functools.lru_cache(maxsize=1)
def _model_class() -> type:
    k = keras()

    class BookKeepingDPSequential(k.Sequential):
        """A Sequential model whose ``train_step`` is book-keeping DP-SGD (see the module)."""

        def __init__(self, layers: list[Any], l2_norm_clip: float, noise_multiplier: float,
                     noise: GaussianNoise | None = None) -> None:
            if not supported(layers):
                raise NotImplementedError("book-keeping clipping supports Dense and Conv2D layers only")
            super().__init__(layers)
            self.l2_norm_clip = float(l2_norm_clip)
            self.noise_multiplier = float(noise_multiplier)
            self._per_example_loss = k.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=k.losses.Reduction.NONE)
            # Noise: CSPRNG normals the trainer refills before every step (common.entropy),
            # never TensorFlow's 32-bit OS seeding.
            self.dp_noise = noise if noise is not None else GaussianNoise()
            # The white-box audit's gradient canaries (clients.whitebox.CanaryTaps); None in every
            # training run. Set before the step is traced.
            self.gradient_canaries: Any = None

        def clip_factors(self, norms: Any) -> Any:
            """Each example's clip factor, ``min(1, C / norm)``."""
            return self.l2_norm_clip / tf().maximum(norms, self.l2_norm_clip)

        def dp_gradients(self, x: Any, y: Any) -> tuple[list[Any], Any]:
            """The noised, clipped, batch-averaged gradients and the per-example losses."""
            t = tf()
            taps = []
            with t.GradientTape() as tape:
                h = x
                for layer in self.layers:
                    kind = _layer_kind(layer)
                    if kind == "none":
                        h = layer(h, training=True)
                        continue
                    if kind == "dense" and h.shape.rank != 2:
                        raise NotImplementedError("book-keeping Dense needs flat inputs")
                    activation = layer.activation
                    layer.activation = None  # trace time only: the pre-activation output
                    try:
                        base = layer(h, training=True)
                    finally:
                        layer.activation = activation
                    taps.append((layer, kind, h, base))
                    h = activation(base) if activation is not None else base
                losses = self._per_example_loss(y, h)
                total = t.reduce_sum(losses)
            outputs = tape.gradient(total, [base for *_, base in taps])
            # Conv2D layers where it pays keep each example's kernel gradient: its norm and the
            # clipped sum both come from it, and no second pass through the layer is needed.
            per_example = [per_example_kernel_grads(layer, inp, g) if kind == "conv2d" else None
                           for (layer, kind, inp, _), g in zip(taps, outputs)]
            squared = t.add_n([
                _dense_squared_norms(layer, inp, g) if kind == "dense"
                else conv2d_squared_norms(layer, inp, g) if per is None
                else _per_example_squared_norms(layer, per, g)
                for (layer, kind, inp, _), g, per in zip(taps, outputs, per_example)
            ])
            canaries = self.gradient_canaries
            if canaries is not None:  # the audit's canaries are clipped with the batch's examples
                examples = t.shape(squared)[0]
                squared = t.concat([squared, canaries.squared_norms()], 0)
            norms = t.sqrt(t.maximum(squared, 0.0))
            clip = self.clip_factors(norms)
            if canaries is not None:
                clip, canary_clip = clip[:examples], clip[examples:]
            by_variable = {}
            for (layer, kind, inp, _), g, per in zip(taps, outputs, per_example):
                if per is not None:
                    grads = _clipped_sums(layer, per, g, clip)
                else:
                    wg = g * t.reshape(clip, [-1] + [1] * (g.shape.rank - 1))
                    grads = _dense_grads(layer, inp, wg) if kind == "dense" else _conv_grads(layer, inp, wg)
                for variable, grad in zip(layer.trainable_weights, grads):
                    by_variable[variable.ref()] = grad
            batch = t.cast(t.shape(y)[0], losses.dtype)
            grads = [by_variable[variable.ref()] for variable in self.trainable_variables]
            if canaries is not None:
                grads = canaries.add_clipped(grads, canary_clip)
                batch += t.cast(t.shape(canary_clip)[0], losses.dtype)
            if self.noise_multiplier > 0:
                grads = self.dp_noise.add_to(grads, self.noise_multiplier * self.l2_norm_clip)
            grads = [grad / batch for grad in grads]
            if canaries is not None:
                canaries.observe(grads)
            return grads, losses

        def train_step(self, data: Any) -> dict[str, Any]:
            x, y, _ = k.utils.unpack_x_y_sample_weight(data)
            grads, losses = self.dp_gradients(x, y)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": tf().reduce_mean(losses)}

    return BookKeepingDPSequential


def make_model(layers: list[Any], l2_norm_clip: float, noise_multiplier: float,
               noise: GaussianNoise | None = None) -> Any:
    """A book-keeping DP-SGD model; its noise comes from ``noise`` (a new :class:`GaussianNoise`
    by default), whose ``refill`` the caller runs before each step."""
    return _model_class()(layers, l2_norm_clip, noise_multiplier, noise)
