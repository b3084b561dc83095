"""Fast per-example gradient norms for ``Conv2D``: a layer-registry function for TF Privacy.

TF Privacy's fast gradient clipping (``DPSequential`` with a ``LayerRegistry``) computes each
example's gradient norm from one backward pass, layer by layer, without materialising per-example
gradients of the whole model; it ships registry functions for Dense, Embedding and a few NLP
layers, not for ``Conv2D``. A model with an unregistered trainable layer falls back to
per-example gradients for everything. This module adds ``Conv2D``.

For one example, let ``U`` be its input patches (``P`` output positions by ``K = kh*kw*c_in``
values, what ``tf.image.extract_patches`` returns) and ``G`` the loss gradient with respect to the
layer's pre-activation output (``P`` by ``c_out``). The kernel gradient is ``U^T G`` and the bias
gradient is the column sums of ``G``, so

    ||kernel grad||^2 = ||U^T G||_F^2 = <U U^T, G G^T>_F       (the "ghost norm")

Either side is exact. The direct form costs about ``P*K*c_out`` per example, the ghost form
``P^2 * (K + c_out)``; each layer uses the cheaper one (early layers: many positions, few
channels, direct; late layers: few positions, many channels, ghost). Only what the optimiser
needs is computed: squared norms, one per example (or per microbatch).

Neither form calls ``tf.image.extract_patches``, which is slow on CPU. The direct form takes, for
each kernel offset ``(i, j)``, the strided slice of the (padded) input that offset multiplies, and
contracts it with ``G`` over positions: that is the kernel gradient's ``(i, j)`` block, and the
squared blocks sum to the squared norm, without the patch matrix ever being built. The ghost form
builds ``U`` with one gather of the input's channel rows (by concatenating the same slices where
the input has one channel; the layer has few positions there, so ``U`` is small). Measured on 2
CPU cores at batch 64, the seed CNN's three layers' norms take 2-3x less time this way.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedpriv.common.tf_runtime import keras, tf


def squared_norms(x: Any, axis: Any) -> Any:
    """The squared l2 norms of ``x`` over ``axis``: one pass over ``x`` with no squared copy of it
    (measured on 2 Xeon cores, for per-example kernel gradients: 1.5-2.6x faster than summing the
    squares)."""
    return tf().square(tf().math.reduce_euclidean_norm(x, axis=axis))


def _padded(layer: Any, x: Any, out_h: int, out_w: int) -> Any:
    """``x`` with the zero padding the convolution applies (none for ``valid``)."""
    if layer.padding != "same":
        return x
    t = tf()
    pads = [[0, 0]]
    for size, out, k, s, d in zip(x.shape[1:3], (out_h, out_w), layer.kernel_size, layer.strides,
                                  layer.dilation_rate):
        total = max((out - 1) * s + (k - 1) * d + 1 - int(size), 0)
        pads.append([total // 2, total - total // 2])
    return t.pad(x, pads + [[0, 0]])


def _shifted_inputs(layer: Any, x: Any, out_h: int, out_w: int) -> list[Any]:
    """One slice of the (padded) input per kernel offset, in (row, column) order: slice ``(i, j)``
    holds, at each output position, the input value kernel tap ``(i, j)`` multiplies, so the
    kernel gradient at ``(i, j)`` is ``sum over positions of slice^T G``. Strided slices of ``x``
    cost far less than ``tf.image.extract_patches`` on CPU (measured: 2-3x)."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    xp = _padded(layer, x, out_h, out_w)
    return [xp[:, i * dh: i * dh + (out_h - 1) * sh + 1: sh, j * dw: j * dw + (out_w - 1) * sw + 1: sw, :]
            for i in range(kh) for j in range(kw)]


def _patch_indices(layer: Any, in_h: int, in_w: int, out_h: int, out_w: int) -> Any:
    """For each output position (row-major) and kernel tap (kernel row, kernel column), the flat
    spatial index in the padded ``in_h`` x ``in_w`` input of the value the tap multiplies."""
    import numpy as np

    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    rows = np.arange(out_h)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh
    cols = np.arange(out_w)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw
    return (rows * in_w + cols).reshape(-1).astype(np.int32)


def _patches(layer: Any, x: Any, out_h: int | None, out_w: int | None) -> Any:
    """Each output position's input patch, ``(b, h', w', kh*kw*c_in)`` in
    ``tf.image.extract_patches``'s order (kernel row, kernel column, channel).

    With the spatial size known at trace time and more than one input channel, one gather of
    whole channel rows from the (padded) input builds it. Measured on 2 Xeon cores in
    :func:`per_example_kernel_grads` at batch 64 and 256, gathering and one product took 7-30%
    less time than one product per :func:`_shifted_inputs` slice for 2 to 32 input channels;
    concatenating the slices, measured at 32 channels, was slower than either. With one channel,
    where each gathered row is a single value, the slices are concatenated instead."""
    t = tf()
    if None in (out_h, out_w, x.shape[1], x.shape[2]):  # spatial size unknown at trace time
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        return t.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
                                       padding=layer.padding.upper())
    c_in = int(x.shape[-1])
    if c_in == 1:
        return t.concat(_shifted_inputs(layer, x, out_h, out_w), axis=-1)
    xp = _padded(layer, x, out_h, out_w)
    in_h, in_w = int(xp.shape[1]), int(xp.shape[2])
    kh, kw = layer.kernel_size
    flat = t.reshape(xp, [-1, in_h * in_w, c_in])
    rows = t.gather(flat, _patch_indices(layer, in_h, in_w, out_h, out_w), axis=1)
    return t.reshape(rows, [-1, out_h, out_w, kh * kw * c_in])


# Per-example kernel gradients are kept (rather than only their norms) for kernels of at most
# this many weights: at batch 256 that is 64 MiB of float32.
PER_EXAMPLE_KERNEL_LIMIT = 65_536


def per_example_kernel_grads(layer: Any, x: Any, grads: Any) -> tuple[Any, Any] | None:
    """Each example's kernel gradient, ``(b, kh, kw, c_in, c_out)``, from the layer input ``x`` and
    the gradient ``grads`` of the summed loss with respect to its pre-activation output, with each
    example's bias gradient ``(b, c_out)`` where the same product gives it (else None); None where
    the ghost form is cheaper, the spatial size is unknown at trace time, or the kernel is larger
    than :data:`PER_EXAMPLE_KERNEL_LIMIT`.

    One batched matrix product of each example's patch matrix (:func:`_patches`) with its
    output gradient, summed over output positions; with a single input channel, the patches are
    the stacked :func:`_shifted_inputs` slices, one row per kernel offset, and a row of ones
    makes the bias gradient. The weighted sum of these over the batch is the layer's clipped
    kernel gradient, so a caller that has them needs no second backward pass through the layer
    (:mod:`clients.bk_clipping`)."""
    t = tf()
    out_h, out_w = grads.shape[1], grads.shape[2]
    kh, kw = layer.kernel_size
    c_in = int(x.shape[-1])
    if None in (out_h, out_w, x.shape[1], x.shape[2]):
        return None
    if use_ghost_norm(out_h * out_w, kh * kw * c_in, layer.filters) or \
            kh * kw * c_in * layer.filters > PER_EXAMPLE_KERNEL_LIMIT:
        return None
    batch = t.shape(grads)[0]
    g = t.reshape(grads, [batch, out_h * out_w, layer.filters])
    if c_in == 1:
        # One input channel: the offsets' slices stacked make a product of kh*kw rows (measured
        # on 2 Xeon cores: the seed CNN's DP step 5% shorter at batch 64 and 256 than one
        # product per offset, and 1.7-2.5x faster than gathering single values). One more row, of
        # ones, sums the output gradient over positions: the bias gradient, for less than
        # summing it apart (measured for the seed CNN's first layer, with its norms and clipped
        # sums: 1.29 against 1.52 ms at batch 64, 2.47 against 3.33 ms at batch 256).
        slices = _shifted_inputs(layer, x, out_h, out_w)
        if layer.use_bias:
            slices.append(t.ones_like(slices[0]))
        u = t.reshape(t.stack(slices, axis=1), [batch, len(slices), out_h * out_w])
        both = t.matmul(u, g)
        kernel = t.reshape(both[:, : kh * kw], [batch, kh, kw, 1, layer.filters])
        return kernel, (both[:, kh * kw] if layer.use_bias else None)
    u = t.reshape(_patches(layer, x, out_h, out_w), [batch, out_h * out_w, kh * kw * c_in])
    return t.reshape(t.matmul(u, g, transpose_a=True), [batch, kh, kw, c_in, layer.filters]), None


def use_ghost_norm(positions: int, patch_size: int, filters: int) -> bool:
    """The ghost form is cheaper when ``P * (K + c_out) < K * c_out``."""
    return positions * (patch_size + filters) < patch_size * filters


def conv2d_squared_norms(layer: Any, x: Any, grads: Any, num_microbatches: Any = None) -> Any:
    """Per-example (or per-microbatch) squared norms of the gradients of ``layer``'s kernel and
    bias, from its input ``x`` and the gradient ``grads`` of the summed loss with respect to its
    pre-activation output."""
    from tensorflow_privacy.privacy.fast_gradient_clipping.common_manip_utils import maybe_add_microbatch_axis

    t = tf()
    out_h, out_w = grads.shape[1], grads.shape[2]
    kh, kw = layer.kernel_size
    patch = kh * kw * int(x.shape[-1])
    static = None not in (out_h, out_w, x.shape[1], x.shape[2])
    if static and not use_ghost_norm(out_h * out_w, patch, layer.filters):
        # Direct form, one kernel offset at a time: kernel gradient (i, j) = slice_ij^T G.
        g = grads
        slices = _shifted_inputs(layer, x, out_h, out_w)
        equation = "bhwi,bhwc->bic"
        if num_microbatches is not None:
            # A microbatch's gradient sums its examples': one more summed axis.
            g = maybe_add_microbatch_axis(g, num_microbatches)
            slices = [maybe_add_microbatch_axis(s, num_microbatches) for s in slices]
            equation = "bmhwi,bmhwc->bic"
        squared = t.add_n([squared_norms(t.einsum(equation, s, g), [1, 2]) for s in slices])
        if layer.use_bias:
            sums = t.reduce_sum(g, axis=list(range(1, g.shape.rank - 1)))
            squared += squared_norms(sums, 1)
        return squared
    u = _patches(layer, x, out_h, out_w)                     # (b, h', w', K)
    shape = t.shape(u)
    u = t.reshape(u, [shape[0], shape[1] * shape[2], shape[3]])          # (b, P, K)
    g = t.reshape(grads, [shape[0], shape[1] * shape[2], layer.filters])  # (b, P, C)
    if num_microbatches is not None:
        # A microbatch's gradient sums its examples': stack their positions.
        u = maybe_add_microbatch_axis(u, num_microbatches)
        g = maybe_add_microbatch_axis(g, num_microbatches)
        su, sg = t.shape(u), t.shape(g)
        u = t.reshape(u, [su[0], su[1] * su[2], su[3]])
        g = t.reshape(g, [sg[0], sg[1] * sg[2], sg[3]])
    if static:  # ghost form
        uut = t.matmul(u, u, transpose_b=True)               # (b, P, P)
        ggt = t.matmul(g, g, transpose_b=True)
        squared = t.reduce_sum(uut * ggt, axis=[1, 2])
    else:
        kernel_grads = t.matmul(u, g, transpose_a=True)      # (b, K, C)
        squared = squared_norms(kernel_grads, [1, 2])
    if layer.use_bias:
        squared += squared_norms(t.reduce_sum(g, axis=1), 1)
    return squared


def conv2d_layer_computation(layer_instance: Any, input_args: Sequence[Any], input_kwargs: Mapping[str, Any],
                             tape: Any, num_microbatches: Any = None) -> tuple[Any, Any, Any]:
    """Registry function for ``tf.keras.layers.Conv2D`` (channels last, groups 1), in TF
    Privacy's registry protocol: ``(base_vars, outputs, sqr_norm_fn)``."""
    if input_kwargs:
        raise ValueError("Conv2D layer calls should not receive kwargs")
    if len(input_args) != 1:
        raise ValueError("Only layer inputs of length 1 are permitted")
    if layer_instance.data_format != "channels_last" or getattr(layer_instance, "groups", 1) != 1:
        raise NotImplementedError("Conv2D fast clipping needs channels_last and groups=1")
    x = input_args[0]
    activation = layer_instance.activation
    layer_instance.activation = None
    try:
        base_vars = layer_instance(x)  # the pre-activation output, bias included
    finally:
        layer_instance.activation = activation
    tape.watch(base_vars)
    outputs = activation(base_vars) if activation else base_vars

    def sqr_norm_fn(base_vars_grads: Any) -> Any:
        return conv2d_squared_norms(layer_instance, x, base_vars_grads, num_microbatches)

    return base_vars, outputs, sqr_norm_fn


def layer_registry() -> Any:
    """TF Privacy's default registry (Dense, Embedding) plus Conv2D."""
    from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import make_default_layer_registry

    registry = make_default_layer_registry()
    registry.insert(keras().layers.Conv2D, conv2d_layer_computation)
    return registry
