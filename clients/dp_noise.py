"""TF Privacy's DP-SGD implementations with their noise drawn from :class:`common.entropy.GaussianNoise`.

TF Privacy adds its noise with unseeded ``tf.random.normal`` (or ``tf.random_normal_initializer``),
which TensorFlow seeds from 32 bits of OS entropy per process (see :mod:`common.entropy`). Each
fallback keeps TF Privacy's clipping and changes only where the noise comes from, with the same
distribution: N(0, (z C)^2) on the sum of clipped gradients, then divided by the number of
microbatches B (the batch size with one example per microbatch).

- ``fast`` (:func:`dp_sequential`): TF Privacy's ``DPSequential`` runs with noise multiplier 0,
  so it clips, sums and averages but draws nothing; the noise N(0, (z C / B)^2) is added to its
  averaged gradients on their way to the optimizer.
- ``keras``, the textbook optimizers (:func:`keras_optimizer`): TF Privacy's generic DP
  optimizers take the ``DPQuery`` that adds the noise as an argument; they get a
  ``GaussianSumQuery`` whose ``get_noised_result`` draws from the generator.
- ``vectorized`` (:func:`vectorized_optimizer`): the noise is inline in TF Privacy's
  ``_compute_gradients``, so the subclass restates that method -- per-microbatch jacobian,
  TF Privacy's ``clip_gradients_vmap``, sum -- and adds the noise itself.
"""

from __future__ import annotations

import functools
from typing import Any

from fedpriv.common.entropy import GaussianNoise
from fedpriv.common.tf_runtime import tf


@functools.lru_cache(maxsize=1)
def _dp_sequential_class() -> type:
    from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPSequential

    from fedpriv.common.tf_runtime import keras

    t, k = tf(), keras()

    class FreshNoiseDPSequential(DPSequential):
        """DPSequential whose noise comes from a :class:`GaussianNoise` (see the module)."""

        def __init__(self, noise: GaussianNoise, l2_norm_clip: float, noise_multiplier: float,
                     **kwargs: Any) -> None:
            super().__init__(l2_norm_clip=l2_norm_clip, noise_multiplier=0.0, **kwargs)
            self.dp_noise = noise
            self.dp_noise_stddev = float(noise_multiplier) * float(l2_norm_clip)  # on the sum

        def train_step(self, data: Any) -> Any:
            if self.dp_noise_stddev == 0:
                return super().train_step(data)
            _, y, _ = k.utils.unpack_x_y_sample_weight(data)
            microbatches = self._num_microbatches or t.shape(y)[0]  # what DPSequential divides by
            stddev = self.dp_noise_stddev / t.cast(microbatches, t.float32)
            optimizer = self.optimizer
            apply_gradients = optimizer.apply_gradients

            def noised_apply_gradients(grads_and_vars: Any, *args: Any, **kwargs: Any) -> Any:
                grads, variables = zip(*grads_and_vars)
                return apply_gradients(zip(self.dp_noise.add_to(grads, stddev), variables), *args, **kwargs)

            # DPSequential.train_step hands its gradients to self.optimizer.apply_gradients; this
            # instance attribute stands in for that one call while the step runs (or is traced).
            optimizer.apply_gradients = noised_apply_gradients
            try:
                return super().train_step(data)
            finally:
                del optimizer.apply_gradients

    return FreshNoiseDPSequential


def dp_sequential(noise: GaussianNoise, l2_norm_clip: float, noise_multiplier: float, **kwargs: Any) -> Any:
    """TF Privacy's ``DPSequential`` (fast clipping; ``kwargs`` go to it) with fedpriv's noise."""
    return _dp_sequential_class()(noise, l2_norm_clip, noise_multiplier, **kwargs)


@functools.lru_cache(maxsize=1)
def _query_class() -> type:
    import dp_accounting
    from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

    t = tf()

    class FreshNoiseGaussianSumQuery(GaussianSumQuery):
        """TF Privacy's GaussianSumQuery (clip each record, sum, add N(0, stddev^2)) with the
        noise drawn from a :class:`GaussianNoise`."""

        def __init__(self, l2_norm_clip: float, stddev: float, noise: GaussianNoise) -> None:
            super().__init__(l2_norm_clip, stddev)
            self.dp_noise = noise

        def get_noised_result(self, sample_state: Any, global_state: Any) -> tuple[Any, Any, Any]:
            flat = t.nest.flatten(sample_state)
            if self._stddev > 0:
                flat = self.dp_noise.add_to(flat, global_state.stddev)
            event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
            return t.nest.pack_sequence_as(sample_state, flat), global_state, event

    return FreshNoiseGaussianSumQuery


def keras_optimizer(noise: GaussianNoise, optimizer: str, l2_norm_clip: float, noise_multiplier: float,
                    num_microbatches: int | None, **kwargs: Any) -> Any:
    """TF Privacy's textbook DP optimizer (``DPKerasSGDOptimizer`` or ``DPKerasAdamOptimizer``:
    the generic class with a Gaussian sum query) drawing its noise from ``noise``.
    ``kwargs`` (learning rate, momentum) go to the Keras optimizer."""
    from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

    query = _query_class()(l2_norm_clip, l2_norm_clip * noise_multiplier, noise)
    generic = "GenericDPAdamOptimizer" if optimizer == "adam" else "GenericDPSGDOptimizer"
    return getattr(dp_optimizer_keras, generic)(dp_sum_query=query, num_microbatches=num_microbatches, **kwargs)


@functools.lru_cache(maxsize=2)
def _vectorized_class(name: str) -> type:
    from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized as vectorized

    t = tf()
    parent = getattr(vectorized, name)

    class FreshNoiseVectorized(parent):  # type: ignore[misc, valid-type]
        """TF Privacy's vectorized DP optimizer drawing its noise from a :class:`GaussianNoise`."""

        def __init__(self, *args: Any, noise: GaussianNoise, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dp_noise = noise

        def _compute_gradients(self, loss: Any, var_list: Any, grad_loss: Any = None, tape: Any = None) -> Any:
            """TF Privacy's method for a loss tensor and its tape (what Keras's train_step passes),
            with the noise from ``dp_noise``."""
            self._was_dp_gradients_called = True
            if callable(loss) or tape is None:
                raise NotImplementedError("fedpriv's vectorized DP optimizer takes a loss tensor and its tape")
            with tape:
                microbatches = self._num_microbatches or t.shape(loss)[0]
                microbatch_losses = t.reduce_mean(t.reshape(loss, [microbatches, -1]), axis=1)
            var_list = t.nest.flatten(var_list)
            jacobian = tape.jacobian(
                microbatch_losses, var_list,
                unconnected_gradients=(t.UnconnectedGradients.ZERO if self._unconnected_gradients_to_zero
                                       else t.UnconnectedGradients.NONE))
            clipped = t.vectorized_map(lambda g: vectorized.clip_gradients_vmap(g, self._l2_norm_clip), jacobian)
            summed = [t.reduce_sum(g, axis=0) for g in clipped]
            if self._noise_multiplier > 0:
                summed = self.dp_noise.add_to(summed, self._l2_norm_clip * self._noise_multiplier)
            count = t.cast(microbatches, t.float32)
            return [(g / count, v) for g, v in zip(summed, var_list)]

        def get_gradients(self, loss: Any, params: Any) -> Any:
            raise NotImplementedError("graph-mode get_gradients would draw TF Privacy's own noise")

    FreshNoiseVectorized.__name__ = FreshNoiseVectorized.__qualname__ = "FreshNoise" + name
    return FreshNoiseVectorized


def vectorized_optimizer(noise: GaussianNoise, optimizer: str, l2_norm_clip: float, noise_multiplier: float,
                         num_microbatches: int | None, **kwargs: Any) -> Any:
    """TF Privacy's ``VectorizedDPKerasSGDOptimizer`` or ``...AdamOptimizer`` drawing its noise
    from ``noise``. ``kwargs`` (learning rate, momentum) go to the Keras optimizer."""
    name = "VectorizedDPKeras" + ("AdamOptimizer" if optimizer == "adam" else "SGDOptimizer")
    return _vectorized_class(name)(l2_norm_clip, noise_multiplier, num_microbatches, noise=noise, **kwargs)
