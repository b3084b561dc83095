"""The model architectures: counted without TensorFlow exactly as Keras counts them, and the run's
checks before Ray starts import no TensorFlow."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from fedpriv.common.config import ModelSection
from fedpriv.common.models import architecture, build_model, cnn_output_size, parameter_count
from fedpriv.common.tf_runtime import nvidia_device_present


@pytest.mark.parametrize("name, units, layers, shape, classes", [
    ("cnn", 64, 1, (28, 28, 1), 10),
    ("cnn", 64, 1, (32, 32, 3), 10),
    ("cnn", 64, 1, (23, 30, 2), 4),
    ("mlp", 128, 1, (28, 28, 1), 10),
    ("mlp", 1260, 1, (28, 28, 1), 10),
    ("mlp", 64, 3, (20,), 3),
    ("mlp", 7, 0, (5,), 2),
    ("mlp", 16, 2, (4, 4), 5),
])
def test_parameter_count_is_kerass(name, units, layers, shape, classes):
    model = dataclasses.replace(ModelSection(), mlp_units=units, mlp_layers=layers)
    keras_model = build_model(name, model, shape, classes)
    assert parameter_count(name, model, shape, classes) == keras_model.count_params()
    # the Keras layers are the architecture's, one for one after the input
    assert len(keras_model.layers) == len(architecture(name, model, shape, classes))


def test_cnn_output_size_is_the_last_convolutions():
    model = build_model("cnn", ModelSection(), (23, 30, 2), 10)
    last_conv = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-1]
    assert cnn_output_size((23, 30, 2)) == min(last_conv.output_shape[1:3]) == 2
    assert cnn_output_size((17, 17, 1)) < 1 <= cnn_output_size((18, 18, 1))
    build_model("cnn", ModelSection(), (18, 18, 1), 10)  # the smallest it takes


@pytest.mark.parametrize("nodes, present", [
    ((), False), (("nvidia-uvm", "nvidia-modeset"), False),  # no control node, no GPU node
    (("nvidiactl",), True), (("nvidia0",), True), (("nvidia3",), True), (("dxg",), True),
])
def test_nvidia_device_present(tmp_path, nodes, present):
    for node in nodes:
        (tmp_path / node).touch()
    assert nvidia_device_present(tmp_path) is present


@pytest.mark.skipif(nvidia_device_present(), reason="this machine has an NVIDIA device: TensorFlow is asked")
def test_a_simulations_checks_import_no_tensorflow(tmp_path):
    """``fedpriv simulate`` plans the run (data, partitions, model size, GPUs, privacy warnings)
    before Ray starts; with no GPU device that takes no TensorFlow, whose import costs seconds."""
    code = (
        "import sys\n"
        "from fedpriv.common.settings import resolve_config\n"
        "from fedpriv.simulations.run import plan\n"
        "p = plan(resolve_config('quickstart', None, []))\n"
        "assert p.model_parameters == 93322 and p.gpus_per_client == 0, p\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = {**os.environ, "FEDPRIV_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
