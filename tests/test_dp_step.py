"""One DP-SGD step through fedpriv's trainer: clipping bounds each example, noise is added.

The model is one linear Dense layer with a squared loss on known inputs, so every example's
gradient is known in closed form and the step's update can be checked exactly.
"""

import numpy as np
import pytest

from fedpriv.clients.trainer import LocalTrainer, choose_implementation
from fedpriv.common.config import ClientSection, DPSection, ModelSection

IMPLEMENTATIONS = ["vectorized", "keras", "fast", "bookkeeping"]
LR = 1.0


def _trainer(implementation, clip, noise, dims=4, classes=3):
    # A 0-hidden-layer MLP is a single Dense layer: logits = x W + b.
    return LocalTrainer(
        "mlp",
        ModelSection(mlp_layers=0),
        ClientSection(learning_rate=LR, batch_size=4, optimizer="sgd", momentum=0.0),
        DPSection(enabled=True, l2_norm_clip=clip, noise_multiplier=noise, implementation=implementation),
        (dims,),
        classes,
    )


def _per_example_grads(trainer, x, y):
    """Exact per-example gradients of the trainer's loss, computed with a plain GradientTape."""
    from fedpriv.common.tf_runtime import keras, tf

    loss_fn = keras().losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = []
    for i in range(len(y)):
        with tf().GradientTape() as tape:
            loss = loss_fn(y[i : i + 1], trainer.model(x[i : i + 1]))
        grads.append([g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)])
    return grads


def _flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_clipping_bounds_each_examples_contribution(implementation):
    clip = 0.5
    trainer = _trainer(implementation, clip=clip, noise=0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 4)).astype(np.float32)
    x[0] *= 1000.0  # one example with an enormous gradient
    y = np.array([0, 1, 2, 1])
    y[0] = int(np.argmin(trainer.model(x[:1]).numpy()))  # wrong and saturated: a huge gradient
    before = trainer.model.get_weights()
    grads = [_flat(g) for g in _per_example_grads(trainer, x, y)]
    assert np.linalg.norm(grads[0]) > 100 * clip  # the outlier really needs clipping

    trainer.step(x, y)
    update = _flat(before) - _flat(trainer.model.get_weights())

    clipped = [g * min(1.0, clip / np.linalg.norm(g)) for g in grads]
    expected = LR * np.mean(clipped, axis=0)
    np.testing.assert_allclose(update, expected, rtol=1e-3, atol=1e-5)
    # The outlier moved the model by at most clip / batch, however large its gradient.
    assert np.linalg.norm(LR * clipped[0] / len(y)) <= clip / len(y) + 1e-6


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_noise_is_really_added(implementation):
    clip, noise, batch = 1.0, 2.0, 4
    dims = 256
    trainer = _trainer(implementation, clip=clip, noise=noise, dims=dims, classes=4)
    x = np.zeros((batch, dims), dtype=np.float32)  # zero inputs: weight gradients are exactly 0
    y = np.zeros(batch, dtype=np.int64)
    before = trainer.model.get_weights()
    trainer.step(x, y)
    kernel_update = before[0] - trainer.model.get_weights()[0]
    # Noise N(0, (z C)^2) on the summed gradient, divided by the batch size.
    expected_std = LR * noise * clip / batch
    assert kernel_update.size == dims * 4
    assert abs(kernel_update.std() / expected_std - 1) < 0.1
    assert abs(kernel_update.mean()) < 4 * expected_std / np.sqrt(kernel_update.size)

    # Two steps from the same weights on the same batch differ: the noise is fresh each time.
    trainer.model.set_weights(before)
    trainer.step(x, y)
    again = before[0] - trainer.model.get_weights()[0]
    assert not np.allclose(again, kernel_update)


def test_no_dp_mode_takes_exact_gradient_steps():
    trainer = LocalTrainer("mlp", ModelSection(mlp_layers=0),
                           ClientSection(learning_rate=LR, optimizer="sgd"), DPSection(enabled=False),
                           (4,), 3)
    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32) * 100
    y = np.array([0, 1, 2, 0])
    before = trainer.model.get_weights()
    grads = [_flat(g) for g in _per_example_grads(trainer, x, y)]
    trainer.step(x, y)
    np.testing.assert_allclose(_flat(before) - _flat(trainer.model.get_weights()),
                               LR * np.mean(grads, axis=0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("records", [40, 13, 97])
def test_train_follows_the_public_schedule_whatever_the_local_record_count(records):
    trainer = _trainer("bookkeeping", clip=1.0, noise=1.1)
    x = np.random.default_rng(2).normal(size=(records, 4)).astype(np.float32)
    y = np.arange(records) % 3
    result = trainer.train(trainer.model.get_weights(), x, y, schedule_examples=40)
    assert result.num_examples == records
    assert result.steps == 10  # 1 epoch of ceil(40 / 4) steps, planned for 40 records
    assert result.spend.sampling_probability == pytest.approx(4 / 40)
    assert result.spend.noise_multiplier == 1.1 and result.spend.steps == 10


def test_microbatching_halves_the_effective_noise_in_the_spend():
    trainer = LocalTrainer(
        "mlp", ModelSection(mlp_layers=0), ClientSection(batch_size=8),
        DPSection(noise_multiplier=1.2, microbatches=2, implementation="vectorized"), (4,), 3)
    x = np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32)
    result = trainer.train(trainer.model.get_weights(), x, np.arange(40) % 3, schedule_examples=40)
    assert result.spend.noise_multiplier == pytest.approx(0.6)


def test_auto_implementation():
    from fedpriv.common.config import ModelSection
    from fedpriv.common.models import build_layers
    from fedpriv.common.tf_runtime import keras

    cnn = build_layers("cnn", ModelSection(), (28, 28, 1), 10)
    assert choose_implementation(DPSection(implementation="auto"), cnn) == "bookkeeping"
    other = [keras().layers.InputLayer(input_shape=(4,)), keras().layers.LayerNormalization(),
             keras().layers.Dense(2)]
    assert choose_implementation(DPSection(implementation="auto"), other) == "fast"
    assert choose_implementation(DPSection(implementation="auto", microbatches=4)) == "vectorized"
    assert choose_implementation(DPSection(implementation="keras")) == "keras"


def test_a_trainer_is_shared_within_a_thread_never_between_threads():
    """clients.trainer.get_trainer keeps one trainer per thread and configuration: a trainer's
    model is overwritten by every call, so two ClientApps running at once must not share one."""
    import threading

    from fedpriv.clients.trainer import get_trainer

    args = ("mlp", ModelSection(mlp_layers=0), ClientSection(), DPSection(), (8,), 3)
    here = get_trainer(*args)
    assert get_trainer(*args) is here
    assert get_trainer("mlp", ModelSection(mlp_layers=0), ClientSection(batch_size=8), DPSection(), (8,), 3) is not here
    seen = []
    worker = threading.Thread(target=lambda: seen.extend([get_trainer(*args), get_trainer(*args)]))
    worker.start()
    worker.join()
    assert seen[0] is seen[1] and seen[0] is not here


@pytest.mark.parametrize("implementation", ["none", "bookkeeping"])
def test_a_step_returns_its_own_batchs_loss_not_a_running_mean(implementation):
    from fedpriv.common.tf_runtime import keras

    dp = DPSection(enabled=False) if implementation == "none" else \
        DPSection(enabled=True, l2_norm_clip=1.0, noise_multiplier=0.0, implementation=implementation)
    trainer = LocalTrainer("mlp", ModelSection(mlp_layers=0), ClientSection(learning_rate=LR, optimizer="sgd"),
                           dp, (4,), 3)
    rng = np.random.default_rng(3)
    loss_fn = keras().losses.SparseCategoricalCrossentropy(from_logits=True)
    for size in (4, 9, 2):  # the first batch's loss would otherwise stay in the others'
        x = rng.normal(size=(size, 4)).astype(np.float32) * 10
        y = rng.integers(0, 3, size)
        expected = float(loss_fn(y, trainer.model(x)))  # before the step: the loss the step descends
        assert trainer.step(x, y) == pytest.approx(expected, rel=1e-4)
