"""Local training on one client: DP-SGD with TF Privacy, or plain Keras for baselines.

Batches are drawn by Poisson sampling -- each local record joins a step's batch independently
with probability ``q`` -- because that is what the record-level accounting in
:mod:`common.accounting` assumes. The rate and the number of steps follow
:func:`common.accounting.dpsgd_schedule` on the run's public ``schedule_examples``, not on the
node's own record count: the spend, which the node declares to the server, is then the same for
every node and says nothing about how much data it holds. The sampling and the DP noise draw from the operating system's
CSPRNG (:mod:`common.entropy`), never from the run seed nor from TensorFlow's 32-bit OS seeding:
an adversary who could reproduce them could subtract the noise. Every implementation's noise
comes from one :class:`common.entropy.GaussianNoise`, refilled before each step
(:meth:`LocalTrainer.step`) with normals from an AES-256-CTR keystream under a fresh 384-bit
``os.urandom`` seed; the batches come from a numpy Philox generator keyed from ``os.urandom``
each round.

One trainer (model plus compiled optimizer) is kept per process and configuration, and its
weights and optimizer state are reset for every round, so Ray workers that host many virtual
clients do not rebuild and retrace the model for each one.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from fedpriv.common.accounting import DPSGDSpend, dpsgd_schedule, effective_noise_multiplier
from fedpriv.common.config import ClientSection, DPSection, ModelSection
from fedpriv.common.entropy import GaussianNoise, numpy_generator
from fedpriv.common.models import build_layers
from fedpriv.common.tf_runtime import keras, tf

log = logging.getLogger("fedpriv")

@dataclass(frozen=True)
class TrainResult:
    weights: list[np.ndarray]
    num_examples: int
    steps: int
    mean_loss: float
    spend: DPSGDSpend | None  # None when DP is off


def choose_implementation(dp: DPSection, layers: list[Any] | None = None) -> str:
    """'auto': book-keeping DP-SGD where the model allows, else TF Privacy's DPSequential;
    the vectorized optimizer when microbatches are asked for.

    Book-keeping (:mod:`clients.bk_clipping`) takes each example's gradient norm and the clipped
    gradient from one forward and one backward pass; DPSequential's fast clipping (TF Privacy's
    registry for Dense, fedpriv's for Conv2D, :mod:`clients.conv_clipping`) needs two of each.
    Both clip per example only. benchmarks/dp_step.py measures every implementation side by side.
    """
    if dp.implementation != "auto":
        return dp.implementation
    if dp.microbatches:
        return "vectorized"
    from fedpriv.clients.bk_clipping import supported

    return "bookkeeping" if layers is None or supported(layers) else "fast"


class LocalTrainer:
    """A compiled model for one (model, client, DP) configuration."""

    def __init__(
        self,
        model_name: str,
        model: ModelSection,
        client: ClientSection,
        dp: DPSection,
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        self.client = client
        self.dp = dp
        k = keras()
        layers = build_layers(model_name, model, input_shape, num_classes)
        self.implementation = choose_implementation(dp, layers) if dp.enabled else "none"
        self.applied_noise_multiplier = dp.noise_multiplier  # what the optimizer adds, always the configured z
        # The one source of DP-SGD noise, whichever implementation runs (see common.entropy).
        self.noise = GaussianNoise() if dp.enabled else None
        if self.implementation == "bookkeeping":
            from fedpriv.clients.bk_clipping import make_model

            self.model = make_model(layers, dp.l2_norm_clip, self.applied_noise_multiplier, self.noise)
            loss = k.losses.SparseCategoricalCrossentropy(from_logits=True)  # train_step clips per example
            optimizer = self._plain_optimizer()
        elif self.implementation == "fast":
            from fedpriv.clients.conv_clipping import layer_registry
            from fedpriv.clients.dp_noise import dp_sequential

            # use_xla=False: Poisson batches change shape every step, and XLA would recompile.
            self.model = dp_sequential(
                self.noise,
                l2_norm_clip=dp.l2_norm_clip,
                noise_multiplier=self.applied_noise_multiplier,
                layer_registry=layer_registry(),
                use_xla=False,
                layers=layers,
            )
            loss = k.losses.SparseCategoricalCrossentropy(from_logits=True)
            optimizer = self._plain_optimizer()
        else:
            self.model = k.Sequential(layers)
            if self.implementation == "none":
                loss = k.losses.SparseCategoricalCrossentropy(from_logits=True)
                optimizer = self._plain_optimizer()
            else:
                # TF Privacy's DP optimizers clip per microbatch, so they need per-example losses.
                loss = k.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction=k.losses.Reduction.NONE
                )
                optimizer = self._dp_optimizer()
        self.model.compile(optimizer=optimizer, loss=loss)
        self.optimizer = optimizer
        self._initial_optimizer_state: list[np.ndarray] | None = None
        self._train_step: Any = None  # traced on the first step (see _step_function)

    # ---- optimizers ---------------------------------------------------------------------
    def _plain_optimizer(self) -> Any:
        opts = keras().optimizers.legacy
        if self.client.optimizer == "adam":
            return opts.Adam(learning_rate=self.client.learning_rate)
        return opts.SGD(learning_rate=self.client.learning_rate, momentum=self.client.momentum)

    def _dp_optimizer(self) -> Any:
        """TF Privacy's textbook or vectorized DP optimizer, its noise from ``self.noise``."""
        from fedpriv.clients.dp_noise import keras_optimizer, vectorized_optimizer

        dp = self.dp
        hyper: dict[str, Any] = {"learning_rate": self.client.learning_rate}
        if self.client.optimizer == "sgd":
            hyper["momentum"] = self.client.momentum
        make = vectorized_optimizer if self.implementation == "vectorized" else keras_optimizer
        return make(self.noise, self.client.optimizer, l2_norm_clip=dp.l2_norm_clip,
                    noise_multiplier=self.applied_noise_multiplier,
                    num_microbatches=dp.microbatches or None, **hyper)

    # ---- training -----------------------------------------------------------------------
    def _reset_optimizer(self) -> None:
        """Each round starts from fresh optimizer state (no momentum carried between clients)."""
        variables = self.optimizer.variables()
        if self._initial_optimizer_state is None:
            self._initial_optimizer_state = [np.zeros(v.shape, v.dtype.as_numpy_dtype) for v in variables]
        for variable, initial in zip(variables, self._initial_optimizer_state):
            variable.assign(initial)

    def _schedule(self, schedule_examples: int) -> tuple[float, int]:
        """Sampling rate and number of steps for one round, planned for ``schedule_examples``."""
        return dpsgd_schedule(schedule_examples, self.client.batch_size, self.client.local_epochs)

    def planned_spend(self, schedule_examples: int) -> DPSGDSpend | None:
        """What one round planned for ``schedule_examples`` records spends (None without DP),
        whatever the number of local records."""
        if not self.dp.enabled:
            return None
        q, steps = self._schedule(schedule_examples)
        z = effective_noise_multiplier(self.dp.noise_multiplier, self.dp.microbatches, self.client.batch_size)
        return DPSGDSpend(sampling_probability=q, noise_multiplier=z, steps=steps)

    def _step_function(self, x: np.ndarray, y: np.ndarray) -> Any:
        """The model's own ``train_step`` as one ``tf.function`` whose batch dimension is left
        open. Poisson sampling changes the batch size at every step; Keras's ``train_on_batch``
        traces its graph for the first size and again, generalised, for the second, and a trace
        of a DP model costs seconds of CPU (in every ClientApp process and every simulation
        thread). Traced once here, for any batch size, and without AutoGraph: the train steps'
        Python branches and loops depend on settings and shapes, never on tensor values, and
        tracing the book-keeping CNN step takes 0.7 s this way against 2.6 + 0.4 s in Keras
        (tests/test_dp_step.py runs every implementation through this step)."""
        if self._train_step is None:
            model = self.model

            def train_step(xb: Any, yb: Any) -> Any:
                for metric in model.metrics:  # this batch's loss, not a running mean (in the graph:
                    metric.reset_state()  # eagerly, about 0.4 ms a step, a sixth of the plain MLP step)
                return model.train_step((xb, yb))["loss"]

            signature = [tf().TensorSpec([None, *x.shape[1:]], x.dtype), tf().TensorSpec([None, *y.shape[1:]], y.dtype)]
            self._train_step = tf().function(train_step, input_signature=signature, autograph=False)
        return self._train_step

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One training step on this batch, its loss returned, with the DP noise pool first
        refilled (fresh normals from a fresh ``os.urandom`` seed). (The loss is this batch's:
        the step resets Keras's running loss metric, if the model has one, first.)"""
        step = self._step_function(x, y)
        if self.noise is not None:
            if not self.noise.size:
                step.get_concrete_function()  # the trace lays out the noise pool
            self.noise.refill()
        return float(step(x, y))

    def batches(self, rng: np.random.Generator, records: int, q: float, steps: int) -> Iterator[np.ndarray]:
        """Each step's sampled indices into ``records``: Poisson sampling, every record joining
        independently with probability ``q``, what the record-level accounting assumes."""
        for _ in range(steps):
            yield np.flatnonzero(rng.random(records) < q)

    def start_round(self, weights: list[np.ndarray]) -> None:
        """The round's starting model, with fresh optimizer state."""
        self.model.set_weights(weights)
        if self.optimizer.variables():
            self._reset_optimizer()

    def round_result(self, examples: int, steps: int, losses: list[float], schedule_examples: int) -> TrainResult:
        """What a round of ``steps`` steps on ``examples`` local records returns."""
        mean_loss = float(np.mean(losses)) if losses else math.nan
        return TrainResult(self.model.get_weights(), examples, steps, mean_loss, self.planned_spend(schedule_examples))

    def train(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
              schedule_examples: int) -> TrainResult:
        """Run ``local_epochs * ceil(schedule_examples / batch_size)`` steps from ``weights``,
        each sampling every local record with ``q = batch_size / schedule_examples``."""
        n = len(y)
        q, steps = self._schedule(schedule_examples)
        self.start_round(weights)
        rng = numpy_generator()  # 384 bits from os.urandom: the sampling must stay secret
        microbatches = self.dp.microbatches if self.dp.enabled else 0
        losses = []
        for chosen in self.batches(rng, n, q, steps):
            if microbatches:
                chosen = chosen[: len(chosen) - len(chosen) % microbatches]
            if len(chosen) == 0:
                continue  # still counted as a step below: accounting stays an upper bound
            losses.append(self.step(x[chosen], y[chosen]))
        return self.round_result(n, steps, losses, schedule_examples)


def get_trainer(*args: Any) -> LocalTrainer:
    """One compiled trainer per thread and configuration (the arguments of LocalTrainer).

    Per thread: a trainer's model is overwritten by every call, so two ClientApps running at once
    in one process must not share it (a Ray actor runs one message at a time on one thread;
    a process can run several on threads). A plain function rather than
    ``lru_cache(LocalTrainer)``: the ClientApp is pickled to Ray workers by reference, and a
    cache object named like the class does not pickle.
    """
    return per_thread(LocalTrainer, *args)


@functools.lru_cache(maxsize=16)
def _per_thread(thread: int, factory: Any, *args: Any) -> Any:
    return factory(*args)


def per_thread(factory: Any, *args: Any) -> Any:
    """``factory(*args)``, built once per thread and arguments (a few kept, least recent dropped).
    A thread's identifier can be reused once it has ended, never while it runs."""
    return _per_thread(threading.get_ident(), factory, *args)
