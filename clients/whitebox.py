"""The white-box audit's client side: gradient canaries in DP-SGD, and what an observer of every
step would see of them (``fedpriv audit --empirical --white-box``).

Only the audit's canary simulation builds a :class:`WhiteBoxTrainer` (the ClientApp picks it when
it is given :class:`common.canaries.GradientCanaries`); no training run has canaries.

Each round, a client's included canaries (:meth:`GradientCanaries.for_client`) join its records
for Poisson sampling: each step draws every example *and* every included canary with the same
probability ``q``, from the same secret generator, and puts the sampled canaries in a fresh random
order. The step
(:class:`clients.bk_clipping.BookKeepingDPSequential` with :class:`CanaryTaps`) appends each
sampled canary's squared norm to its examples' before the clip factors are computed, adds the
clipped canaries to the clipped sum, adds the step's noise, and divides by the batch size counting
the canaries. So a canary meets the same clipping, noise and averaging as an example.

The observer sees each step's privatized gradient (the tensor handed to the optimizer). For every
canary of this client, included or not, the trainer reads it at the canary's parameter, times the
batch size: the step's noisy clipped sum there, ``y = C s + r + N(0, (z C)^2)``, ``s`` whether the
canary was sampled and ``r`` the examples' own gradients at that parameter. The score is the sum
over steps of the log-likelihood ratio of the Poisson-subsampled Gaussian,
``log(1 - q + q exp((C y - C^2 / 2) / (z C)^2))``, with the *configured* ``q``, ``z`` and ``C``:
the most powerful test of "sampled with probability q" against "never there", step by step. Each
client writes its canaries' scores for the round to ``GradientCanaries.sink``.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.clients.trainer import LocalTrainer, TrainResult, per_thread
from fedpriv.common.canaries import GRADIENT_NORM_FACTOR, GradientCanaries
from fedpriv.common.entropy import numpy_generator
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import write_atomic
from fedpriv.common.tf_runtime import tf


class CanaryTaps:
    """The variables a step's canaries go through: the parameters of the canaries sampled for
    the next step (set before it), the parameters to observe, and what the step released there."""

    def __init__(self, variables: list[Any], magnitude: float) -> None:
        t = tf()
        self.variables = variables
        self.sizes = [int(np.prod(v.shape)) for v in variables]
        self.magnitude = float(magnitude)
        self.sampled = t.Variable(np.zeros(0, np.int64), shape=t.TensorShape([None]), trainable=False)
        self.watched = t.Variable(np.zeros(0, np.int64), shape=t.TensorShape([None]), trainable=False)
        self.observed = t.Variable(np.zeros(0, np.float32), shape=t.TensorShape([None]), trainable=False)

    def squared_norms(self) -> Any:
        """The sampled canaries' squared norms before clipping."""
        t = tf()
        return t.fill(t.shape(self.sampled), t.constant(self.magnitude**2, t.float32))

    def add_clipped(self, grads: list[Any], clip: Any) -> list[Any]:
        """``grads`` plus each sampled canary, scaled by its clip factor, at its parameter."""
        t = tf()
        values = clip * self.magnitude
        flat = t.scatter_nd(t.reshape(self.sampled, [-1, 1]), values, [sum(self.sizes)])
        pieces = t.split(flat, self.sizes)
        return [grad + t.reshape(piece, grad.shape) for grad, piece in zip(grads, pieces)]

    def observe(self, grads: list[Any]) -> None:
        """Keep the released gradient at the watched parameters."""
        t = tf()
        flat = t.concat([t.reshape(grad, [-1]) for grad in grads], 0)
        self.observed.assign(t.gather(flat, self.watched))


class WhiteBoxTrainer(LocalTrainer):
    """A book-keeping DP-SGD trainer with gradient canaries, for the white-box audit only."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if self.implementation != "bookkeeping":
            raise FedprivError(f"the white-box audit needs book-keeping DP-SGD (dp.implementation auto or "
                               f"bookkeeping, on Dense and Conv2D layers); this run uses {self.implementation!r}")
        self.taps = CanaryTaps(self.model.trainable_variables, GRADIENT_NORM_FACTOR * self.dp.l2_norm_clip)
        self.model.gradient_canaries = self.taps
        self.num_parameters = sum(self.taps.sizes)
        self.watch: tuple[GradientCanaries, int, int, int | None] | None = None

    def train(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
              schedule_examples: int) -> TrainResult:
        if self.watch is None:
            raise FedprivError("a white-box trainer trains only for the audit (no gradient canaries attached)")
        canaries, client, num_clients, server_round = self.watch
        ids, coords, included = canaries.for_client(num_clients, client, self.num_parameters)
        inside = coords[included]
        n = len(y)
        q, steps = self._schedule(schedule_examples)
        self.start_round(weights)
        self.taps.watched.assign(coords.astype(np.int64))
        clip = self.dp.l2_norm_clip
        variance = (self.dp.noise_multiplier * clip) ** 2
        scores = np.zeros(len(ids))
        losses = []
        rng = numpy_generator()
        # the examples, then the included canaries, sampled alike (LocalTrainer.batches)
        for chosen in self.batches(rng, n + len(inside), q, steps):
            examples, sampled = chosen[chosen < n], chosen[chosen >= n] - n
            if len(examples) == 0:
                continue  # no step: the canaries sampled with it are not released either
            # The sampled canaries join the batch in a fresh random order each step: their norms are
            # all equal, so a bug that singles out one place in the batch (the first of tied largest
            # gradients, say) meets a different canary each time, as it would a different example.
            self.taps.sampled.assign(inside[rng.permutation(sampled)].astype(np.int64))
            losses.append(self.step(x[examples], y[examples]))
            released = self.taps.observed.numpy().astype(np.float64) * (len(examples) + len(sampled))
            exponent = np.minimum((clip * released - clip**2 / 2) / variance, 700.0)
            scores += np.log1p(-q + q * np.exp(exponent)) if q < 1 else exponent
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, scores=scores)
        write_atomic(Path(canaries.sink) / f"client{client}-round{server_round or 0}-{uuid.uuid4().hex}.npz",
                     buffer.getvalue())
        return self.round_result(n, steps, losses, schedule_examples)


def whitebox_trainer(*args: Any) -> WhiteBoxTrainer:
    """One white-box trainer per thread and configuration (like clients.trainer.get_trainer)."""
    return per_thread(WhiteBoxTrainer, *args)


def attach(trainer: Any, canaries: GradientCanaries, client: int, num_clients: int,
           server_round: int | None) -> None:
    """Give ``trainer`` (a :class:`WhiteBoxTrainer`) this client's canaries for this round."""
    if not isinstance(trainer, WhiteBoxTrainer):
        raise FedprivError("gradient canaries need a white-box trainer (clients.whitebox.whitebox_trainer)")
    trainer.watch = (canaries, client, num_clients, server_round)


def collect(canaries: GradientCanaries) -> tuple[np.ndarray, int]:
    """Every canary's score summed over the files the clients wrote, and the number of files."""
    scores = np.zeros(canaries.count)
    files = sorted(Path(canaries.sink).glob("client*.npz"))
    for path in files:
        with np.load(path) as saved:
            np.add.at(scores, saved["ids"], saved["scores"])
    return scores, len(files)
