"""Local training on one client: DP-SGD with TF Privacy, or plain Keras for baselines.

Batches are drawn by Poisson sampling -- each local record joins a step's batch independently
with probability ``q = batch_size / n`` -- because that is what the record-level accounting in
:mod:`common.accounting` assumes. The sampling and the DP noise draw from the operating system's
entropy, never from the run seed: an adversary who knew the seed could otherwise replay them.

One trainer (model plus compiled optimizer) is kept per process and configuration, and its
weights and optimizer state are reset for every round, so Ray workers that host many virtual
clients do not rebuild and retrace the model for each one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.accounting import DPSGDSpend, effective_noise_multiplier
from common.config import ClientSection, DPSection, ModelSection
from common.models import build_layers
from common.tf_runtime import keras

log = logging.getLogger("fedpriv")

# TEST HOOK, never for real use: with this set to 1, DP-SGD clips but adds no noise, while the
# client still declares and records the configured spend. It exists so that the tests can show
# the empirical audit (fedpriv audit --empirical) catching an implementation that does not do
# what its ledger claims.
BREAK_NOISE_ENV = "FEDPRIV_TEST_BREAK_NOISE"


def noise_broken() -> bool:
    """Whether the :data:`BREAK_NOISE_ENV` test hook is on in this process."""
    return os.environ.get(BREAK_NOISE_ENV) == "1"


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
    from clients.bk_clipping import supported

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
        self.applied_noise_multiplier = dp.noise_multiplier
        if dp.enabled and noise_broken():
            self.applied_noise_multiplier = 0.0
            log.warning("fedpriv: %s=1: DP-SGD noise is OFF while the configured spend is still "
                        "declared and recorded (a test hook; never use it for real)", BREAK_NOISE_ENV)
        if self.implementation == "bookkeeping":
            from clients.bk_clipping import make_model

            self.model = make_model(layers, dp.l2_norm_clip, self.applied_noise_multiplier)
            loss = k.losses.SparseCategoricalCrossentropy(from_logits=True)  # train_step clips per example
            optimizer = self._plain_optimizer()
        elif self.implementation == "fast":
            from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPSequential

            from clients.conv_clipping import layer_registry

            # use_xla=False: Poisson batches change shape every step, and XLA would recompile.
            self.model = DPSequential(
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

    # ---- optimizers ---------------------------------------------------------------------
    def _plain_optimizer(self) -> Any:
        opts = keras().optimizers.legacy
        if self.client.optimizer == "adam":
            return opts.Adam(learning_rate=self.client.learning_rate)
        return opts.SGD(learning_rate=self.client.learning_rate, momentum=self.client.momentum)

    def _dp_optimizer(self) -> Any:
        from tensorflow_privacy.privacy.optimizers import (
            dp_optimizer_keras,
            dp_optimizer_keras_vectorized,
        )

        dp = self.dp
        common = {
            "l2_norm_clip": dp.l2_norm_clip,
            "noise_multiplier": self.applied_noise_multiplier,
            "num_microbatches": dp.microbatches or None,
            "learning_rate": self.client.learning_rate,
        }
        if self.client.optimizer == "sgd":
            common["momentum"] = self.client.momentum
        family = dp_optimizer_keras_vectorized if self.implementation == "vectorized" else dp_optimizer_keras
        prefix = "VectorizedDPKeras" if self.implementation == "vectorized" else "DPKeras"
        name = prefix + ("AdamOptimizer" if self.client.optimizer == "adam" else "SGDOptimizer")
        return getattr(family, name)(**common)

    # ---- training -----------------------------------------------------------------------
    def _reset_optimizer(self) -> None:
        """Each round starts from fresh optimizer state (no momentum carried between clients)."""
        variables = self.optimizer.variables()
        if self._initial_optimizer_state is None:
            self._initial_optimizer_state = [np.zeros(v.shape, v.dtype.as_numpy_dtype) for v in variables]
        for variable, initial in zip(variables, self._initial_optimizer_state):
            variable.assign(initial)

    def _schedule(self, n: int) -> tuple[float, int]:
        """Sampling rate and number of steps for one round on ``n`` records."""
        batch = self.client.batch_size
        return min(1.0, batch / n), self.client.local_epochs * math.ceil(n / batch)

    def planned_spend(self, n: int) -> DPSGDSpend | None:
        """What training on ``n`` records for one round spends (None without DP)."""
        if not self.dp.enabled:
            return None
        q, steps = self._schedule(n)
        z = effective_noise_multiplier(self.dp.noise_multiplier, self.dp.microbatches, self.client.batch_size)
        return DPSGDSpend(sampling_probability=q, noise_multiplier=z, steps=steps)

    def train(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> TrainResult:
        """Run ``local_epochs * ceil(n / batch_size)`` Poisson-sampled steps from ``weights``."""
        n = len(y)
        q, steps = self._schedule(n)
        self.model.set_weights(weights)
        if self.optimizer.variables():
            self._reset_optimizer()
        rng = np.random.default_rng()  # fresh OS entropy: the sampling must stay secret
        microbatches = self.dp.microbatches if self.dp.enabled else 0
        losses = []
        for _ in range(steps):
            chosen = np.flatnonzero(rng.random(n) < q)
            if microbatches:
                chosen = chosen[: len(chosen) - len(chosen) % microbatches]
            if len(chosen) == 0:
                continue  # still counted as a step below: accounting stays an upper bound
            loss = self.model.train_on_batch(x[chosen], y[chosen])
            losses.append(float(np.ravel(loss)[0]))  # a scalar, or [loss, *metrics]
        spend = self.planned_spend(n)
        mean_loss = float(np.mean(losses)) if losses else math.nan
        return TrainResult(self.model.get_weights(), n, steps, mean_loss, spend)


@functools.lru_cache(maxsize=4)
def get_trainer(*args: Any) -> LocalTrainer:
    """One compiled trainer per process and configuration (the arguments of LocalTrainer).

    A plain function rather than ``lru_cache(LocalTrainer)``: the ClientApp is pickled to Ray
    workers by reference, and a cache object named like the class does not pickle.
    """
    return LocalTrainer(*args)
