"""The two model families: the seed CNN for images and an MLP for flat features.

Models are returned as lists of Keras layers so the same definition can go into a plain
``Sequential`` or into TF Privacy's ``DPSequential`` (fast clipping).
"""

from __future__ import annotations

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
            raise DataError(
                f"the cnn model needs images of at least 22x22; data has {input_shape[0]}x"
                f"{input_shape[1]}. Use model.name = 'mlp'"
            )
    return name


def cnn_output_size(input_shape: tuple[int, ...]) -> int:
    """Spatial size after Conv-Pool-Conv-Pool-Conv with 3x3 valid convolutions."""
    size = min(input_shape[0], input_shape[1])
    size = (size - (CNN_KERNEL - 1)) // 2
    size = (size - (CNN_KERNEL - 1)) // 2
    return size - (CNN_KERNEL - 1)


def build_layers(name: str, model: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> list[Any]:
    """Layers of the model ``name`` ('cnn' or 'mlp'); the last layer emits logits."""
    from fedpriv.common.tf_runtime import keras

    layers = keras().layers
    if name == "cnn":
        # Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense(classes), the project's seed model.
        return [
            layers.InputLayer(input_shape=input_shape),
            layers.Conv2D(32, CNN_KERNEL, activation=model.activation),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, CNN_KERNEL, activation=model.activation),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, CNN_KERNEL, activation=model.activation),
            layers.Flatten(),
            layers.Dense(64, activation=model.activation),
            layers.Dense(num_classes),
        ]
    stack = [layers.InputLayer(input_shape=input_shape)]
    if len(input_shape) > 1:
        stack.append(layers.Flatten())
    stack += [layers.Dense(model.mlp_units, activation=model.activation) for _ in range(model.mlp_layers)]
    stack.append(layers.Dense(num_classes))
    return stack


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
