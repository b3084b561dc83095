"""The two model families: the seed CNN for images and an MLP for flat features.

Models are returned as lists of Keras layers so the same definition can go into a plain
``Sequential`` or into TF Privacy's ``DPSequential`` (fast clipping).
"""

from __future__ import annotations

import math
from typing import Any

from fedpriv.common.config import ModelSection, RunConfig
from fedpriv.common.errors import DataError

CNN_KERNEL = 3


def resolve_model_name(model: ModelSection, input_shape: tuple[int, ...]) -> str:
    """``auto`` picks the CNN for image-shaped data and the MLP otherwise; checks fit."""
    name = model.name
    if name == "auto":
        name = "cnn" if len(input_shape) == 3 and cnn_output_size(input_shape) >= 1 else "mlp"
    if name == "cnn":
        if len(input_shape) != 3:
            raise DataError(
                f"the cnn model needs images (height, width, channels); data has features of "
                f"shape {input_shape}. Use model.name = 'mlp'"
            )
        if cnn_output_size(input_shape) < 1:
            side = _smallest_cnn_input()
            raise DataError(
                f"the cnn model needs images of at least {side}x{side}; data has {input_shape[0]}x"
                f"{input_shape[1]}. Use model.name = 'mlp'"
            )
    return name


def cnn_output_size(input_shape: tuple[int, ...]) -> int:
    """Spatial size after the CNN's last convolution (Conv-Pool-Conv-Pool-Conv, 3x3 valid)."""
    convs = [after for kind, _, _, after in _walk(architecture("cnn", ModelSection(), input_shape, 1), input_shape)
             if kind == "conv"]
    return min(convs[-1][:2])


def _smallest_cnn_input() -> int:
    """Each side of the smallest image the CNN takes (18)."""
    return next(size for size in range(1, 1000) if cnn_output_size((size, size, 1)) >= 1)


def architecture(name: str, model: ModelSection, input_shape: tuple[int, ...],
                 num_classes: int) -> list[tuple[str, int]]:
    """The model ``name`` ('cnn' or 'mlp') as data, one ``(kind, size)`` per layer after the
    input: ``conv`` (3x3 valid convolution, ``size`` filters), ``pool`` (max pooling, window and
    stride ``size``), ``flatten``, ``dense`` (``size`` units with the model's activation) and
    ``logits`` (``size`` units, no activation). :func:`build_layers` makes the Keras layers from
    it and :func:`parameter_count` counts their weights without TensorFlow."""
    if name == "cnn":
        # Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense(classes), the project's seed model.
        return [("conv", 32), ("pool", 2), ("conv", 64), ("pool", 2), ("conv", 64), ("flatten", 0),
                ("dense", 64), ("logits", num_classes)]
    flat = [("flatten", 0)] if len(input_shape) > 1 else []
    return flat + [("dense", model.mlp_units)] * model.mlp_layers + [("logits", num_classes)]


def build_layers(name: str, model: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> list[Any]:
    """Layers of the model ``name`` (its :func:`architecture`); the last layer emits logits."""
    from fedpriv.common.tf_runtime import keras

    layers = keras().layers
    make = {
        "conv": lambda size: layers.Conv2D(size, CNN_KERNEL, activation=model.activation),
        "pool": lambda size: layers.MaxPooling2D(size),
        "flatten": lambda size: layers.Flatten(),
        "dense": lambda size: layers.Dense(size, activation=model.activation),
        "logits": lambda size: layers.Dense(size),
    }
    return [layers.InputLayer(input_shape=input_shape)] + [
        make[kind](size) for kind, size in architecture(name, model, input_shape, num_classes)]


def build_model(name: str, model: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A plain (non-private) Keras model, used by the server and for baselines."""
    from fedpriv.common.tf_runtime import keras

    return keras().Sequential(build_layers(name, model, input_shape, num_classes))


def configured_model(cfg: RunConfig, weights: list[Any] | None = None) -> Any:
    """The model a run of ``cfg`` trains (its dataset decides the input shape and classes), with
    ``weights`` when given (:class:`ValueError` if they do not fit)."""
    from fedpriv.common.data import load_dataset

    dataset = load_dataset(cfg.data, cfg.run.seed)
    model = build_model(resolve_model_name(cfg.model, dataset.input_shape), cfg.model, dataset.input_shape,
                        dataset.num_classes)
    if weights is not None:
        model.set_weights(weights)
    return model


def parameter_count(name: str, model: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> int:
    """The number of weights of the model ``name`` (Keras's ``count_params``), from its
    :func:`architecture` alone: a run's checks need it before anything imports TensorFlow."""
    count = 0
    for kind, size, before, _ in _walk(architecture(name, model, input_shape, num_classes), input_shape):
        if kind == "conv":
            count += (CNN_KERNEL * CNN_KERNEL * before[2] + 1) * size
        elif kind in ("dense", "logits"):
            count += (before[0] + 1) * size
    return count


def _walk(layers: list[tuple[str, int]], input_shape: tuple[int, ...]) -> Any:
    """``(kind, size, shape before, shape after)`` of each layer of an :func:`architecture`."""
    shape = tuple(input_shape)
    for kind, size in layers:
        before = shape
        if kind == "conv":
            shape = (shape[0] - CNN_KERNEL + 1, shape[1] - CNN_KERNEL + 1, size)
        elif kind == "pool":
            shape = (shape[0] // size, shape[1] // size, shape[2])
        elif kind == "flatten":
            shape = (math.prod(shape),)
        else:  # dense, logits
            shape = (size,)
        yield kind, size, before, shape

