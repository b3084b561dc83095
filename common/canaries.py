"""Canaries for the empirical privacy audit: out-of-distribution records with random labels.

A :class:`Canaries` value is small and fixed (a seed and a count), so it travels to every
simulated client, which rebuilds the same records from it. Each canary is an input of the
dataset's shape whose every feature is, independently, the data's largest value with probability
:data:`DENSITY` and its smallest value otherwise (for images: a random black-and-white speckle,
nothing like a digit), with a label drawn uniformly. Nothing in the real data predicts such a
label, so a model can only fit it by memorising the record: the lower its loss, the more likely
the record was trained on (Steinke, Nasr and Jagielski 2023 use mislabelled inputs the same way;
measured on the built-in data, speckles are memorised faster than mislabelled digits or uniform
noise).

Each canary is included with probability 1/2, independently, and included canaries are dealt to
the simulated clients round-robin by index (canary ``i`` to client ``i mod num_clients``), so
where a canary would go does not depend on whether it goes. Inclusion and the records derive from
the seed; training never uses it (batch sampling and noise draw from the OS), and the audit draws
the seed from the OS unless one is given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedpriv.common import secagg
from fedpriv.common.config import DataSection

DEFAULT_COUNT = 1000  # fedpriv audit --empirical --canaries
DENSITY = 0.2  # share of features set to the data's largest value
DESIGN = (f"out-of-distribution speckles (each feature at the data's maximum with probability "
          f"{DENSITY:g}, else its minimum) with uniformly random labels")


@dataclass(frozen=True)
class CanarySet:
    """``count`` canaries derived from ``seed``: what every kind of canary shares -- the
    independent fair coins that include each one, and the client each would join."""

    seed: int
    count: int

    INCLUSION_STREAM = 1  # the seed's stream the coins come from (one per kind that needs its own)
    MINIMUM = 1

    def __post_init__(self) -> None:
        if self.count < self.MINIMUM:
            noun = "canary" if self.MINIMUM == 1 else "canaries"
            raise ValueError(f"need at least {self.MINIMUM} {noun}, got {self.count}")

    def included(self) -> np.ndarray:
        """Whether each canary is in: independent fair coins."""
        return np.random.default_rng([self.seed, self.INCLUSION_STREAM]).random(self.count) < 0.5

    def client_of(self, num_clients: int) -> np.ndarray:
        """The simulated client each canary would join (round-robin by index)."""
        return np.arange(self.count) % num_clients


@dataclass(frozen=True)
class Canaries(CanarySet):
    """``count`` record canaries derived from ``seed``."""

    def records(self, data: DataSection, run_seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Every canary's input and label, for the dataset ``data`` (with the run's seed)."""
        return _records(self, data, run_seed)

    def for_client(self, data: DataSection, run_seed: int, num_clients: int,
                   client: int) -> tuple[np.ndarray, np.ndarray]:
        """The included canaries that client ``client`` trains on."""
        x, y = self.records(data, run_seed)
        mine = self.included() & (self.client_of(num_clients) == client)
        return x[mine], y[mine]


@functools.lru_cache(maxsize=4)
def _records(canaries: Canaries, data: DataSection, run_seed: int) -> tuple[np.ndarray, np.ndarray]:
    from fedpriv.common.data import load_dataset

    dataset = load_dataset(data, run_seed)
    low, high = float(dataset.x_train.min()), float(dataset.x_train.max())
    rng = np.random.default_rng([canaries.seed, 2])
    on = rng.random((canaries.count, *dataset.input_shape)) < DENSITY
    x = np.where(on, high, low).astype(dataset.x_train.dtype)
    y = rng.integers(0, dataset.num_classes, canaries.count).astype(dataset.y_train.dtype)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


# ---- white-box gradient canaries (fedpriv audit --empirical --white-box) ----------------------
GRADIENT_DEFAULT_COUNT = 10_000  # fedpriv audit --empirical --white-box
GRADIENT_NORM_FACTOR = 100.0  # a gradient canary's norm before clipping, in units of l2_norm_clip
GRADIENT_DESIGN = (f"Dirac gradients: one model parameter each, distinct, of norm {GRADIENT_NORM_FACTOR:g} x "
                   f"l2_norm_clip before clipping")


@dataclass(frozen=True)
class GradientCanaries(CanarySet):
    """``count`` white-box gradient canaries derived from ``seed`` (Steinke, Nasr and Jagielski
    2023, Section 6: Dirac canaries in gradient space).

    Canary ``i`` is a per-example gradient that is zero everywhere but at one model parameter
    (the ``i``-th of ``count`` distinct parameters drawn from the seed), where it is
    :data:`GRADIENT_NORM_FACTOR` times the clipping norm: clipped, it is exactly the clipping
    norm. Inclusion (independent fair coins) and the assignment to clients (round-robin by index)
    are those of :class:`Canaries`. A client's included canaries join its Poisson sampling as
    extra records and pass through the same clipping, noise and averaging as its examples
    (:mod:`clients.whitebox`); after every step the client writes what it released at each of its
    canaries' parameters -- the observation of an adversary who sees every step's update -- to
    the directory ``sink``, one file per client and round.
    """

    sink: str

    def coordinates(self, num_parameters: int) -> np.ndarray:
        """Each canary's parameter (an index into the model's flattened trainable variables)."""
        if num_parameters < self.count:
            raise ValueError(f"{self.count:,} gradient canaries need a model with at least as many "
                             f"parameters; this one has {num_parameters:,}")
        return np.random.default_rng([self.seed, 3]).choice(num_parameters, self.count, replace=False)

    def for_client(self, num_clients: int, client: int, num_parameters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Client ``client``'s canaries: their indices, parameters and inclusion flags."""
        mine = np.flatnonzero(self.client_of(num_clients) == client)
        return mine, self.coordinates(num_parameters)[mine], self.included()[mine]


# ---- canary clients for user-level DP (Andrew et al., ICLR 2024) ------------------------------
CLIENT_DEFAULT_COUNT = 1000  # canary clients, for runs with user-level DP
CLIENT_DESIGN = "canary clients: fixed random unit directions scaled to the user-level clipping norm"


@dataclass(frozen=True)
class CanaryClients(CanarySet):
    """``count`` canary clients derived from ``seed`` (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar,
    "One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024).

    Canary client ``i`` always sends the same update: a random direction of the model's parameter
    space (uniform on the sphere, drawn from the seed), scaled to the user-level clipping norm --
    the largest update a client may send. Each is included in the population with probability 1/2,
    independently; in each round every included canary is sampled with the run's client sampling
    probability, from the OS (as the real clients are), and its update joins the sampled clients'
    clipped updates *before* the user-level noise (:meth:`join`). The server saves the initial
    model to ``sink``; the auditor scores each canary by the cosine between its direction and the
    final model's change.
    """

    sink: str

    INCLUSION_STREAM = 6
    MINIMUM = 2

    def direction(self, i: int, dimension: int) -> np.ndarray:
        """Canary client ``i``'s unit direction (float64), drawn from the seed."""
        v = np.random.default_rng([self.seed, 7, i]).standard_normal(dimension)
        return v / np.linalg.norm(v)

    def join(self, mean: list[np.ndarray], contributors: int, probability: float, clip: float,
             uniform: Callable[[int], np.ndarray] = secagg.uniform) -> tuple[list[np.ndarray], int]:
        """The mean of the round's clipped updates with the sampled included canaries' updates
        joined, and the new number of contributors. Each included canary is sampled as the real
        clients are: when its ``uniform`` draw (from the OS by default) is ``<= probability``."""
        members = np.flatnonzero(self.included())
        sampled = members[uniform(len(members)) <= probability]
        if len(sampled) == 0:
            return mean, contributors
        dimension = int(sum(a.size for a in mean))
        total = np.concatenate([np.asarray(a, np.float64).ravel() for a in mean]) * contributors
        for i in sampled:
            total += clip * self.direction(int(i), dimension)
        joined = contributors + len(sampled)
        flat = total / joined
        out, at = [], 0
        for a in mean:
            out.append(flat[at:at + a.size].reshape(a.shape))
            at += a.size
        return out, joined

    def cosines(self, change: np.ndarray) -> np.ndarray:
        """Each canary's cosine with the model's change (flattened)."""
        change = np.asarray(change, np.float64).ravel()
        norm = np.linalg.norm(change)
        if norm == 0:
            return np.zeros(self.count)
        return np.array([float(self.direction(i, change.size) @ change) / norm for i in range(self.count)])
