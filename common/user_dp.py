"""User-level DP (DP-FedAvg) in one place: one object per noise mode.

As TF Privacy's ``DPQuery`` does, each mode is one object that does both halves of the mechanism
and accounts for what it did: :meth:`encode` is the client's half (clip the update and, in
distributed mode, scale, round and add this client's share of the noise before masking),
:meth:`release` the server's half (turn the mean SecAgg+ or FedAvg hands over into the noisy sum)
and returns, with the noisy sum, the round's ``DpEvent``, its delta addition and the parameters
the ledger records. :meth:`bound_before_round` bounds a round before its sample is known (the
budget check, a round skipped for too few clients).

- :class:`CentralGaussian` (``user_dp.noise_mode = "central"``): the server adds Gaussian noise;
  Poisson-sampled Gaussian accounting (add/remove-one-client adjacency).
- :class:`DistributedDiscreteGaussian` (``"distributed"``): each client adds discrete Gaussian
  noise before masking; Kairouz, Liu and Steinke's zCDP bound, no sampling amplification, the
  SecAgg+ range-overflow probability charged to delta.

What each assumes is written into every ledger entry (``ASSUMPTIONS``) and explained in
docs/secure-aggregation.md, section "User-level DP". The SecAgg+ arithmetic both
modes rely on (samplers, quantization, the distributed plan) stays in :mod:`common.secagg`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fedpriv.common import accounting, secagg
from fedpriv.common.config import RunConfig
from fedpriv.common.lazy import lazy_import

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

USER_LEVEL_SAMPLING = "poisson"  # with user-level DP the server samples clients independently


@dataclass(frozen=True)
class Release:
    """A round's noisy sum with its accounting, as :meth:`release` returns it."""

    noisy_sum: list[np.ndarray]
    event: dp_accounting.DpEvent
    noise_multiplier: float  # the Gaussian noise multiplier the accounting composes
    delta_addition: float  # a failure probability charged to delta
    sampling: str  # "poisson": amplification by client sampling is claimed; "none": it is not
    parameters: dict[str, Any]  # what the ledger records beside the event


class CentralGaussian:
    """The server adds Gaussian noise of ``noise_multiplier * sensitivity`` to the unmasked sum."""

    mode = "central"
    integers = False  # whether encode() already returns the integers SecAgg+ sums
    ASSUMPTIONS = (
        "Gaussian mechanism on the sum of client updates clipped to clipping_norm on the clients; "
        "the sensitivity includes SecAgg+ quantization (at most one step per coordinate) and the "
        "server adds noise of noise_multiplier * sensitivity from the OS CSPRNG; each client "
        "sampled independently with probability q (add/remove-one-client adjacency); the sum is "
        "divided by the expected count q * population, a fixed denominator"
    )
    SUMMARY = (
        "DP-FedAvg: each client clips its update to clipping_norm before masking; the server adds "
        "Gaussian noise of std noise_multiplier * sensitivity to the unmasked sum, which is divided "
        "by the expected number of clients; uniform client weights; each client sampled "
        "independently with probability federation.fraction_train each round (add/remove-one-client "
        "adjacency)"
    )

    def __init__(self, cfg: RunConfig, dimension: int) -> None:
        self.cfg, self.dimension = cfg, dimension

    def encode(self, update: Sequence[np.ndarray], clients_sampled: int,
               random_bytes: secagg.RandomBytes = os.urandom) -> tuple[list[np.ndarray], float]:
        """The client's half: clip to ``clipping_norm``; return the update and its norm before."""
        return secagg.clip_l2(update, self.cfg.user_dp.clipping_norm)

    def round_event(self, population: int, expected: float, noise_multiplier: float | None = None
                    ) -> dp_accounting.DpEvent:
        z = self.cfg.user_dp.noise_multiplier if noise_multiplier is None else noise_multiplier
        return accounting.dpfedavg_round_event(z, population, expected, USER_LEVEL_SAMPLING)

    def bound_before_round(self, population: int, expected: float) -> tuple[dp_accounting.DpEvent, float]:
        return self.round_event(population, expected), 0.0

    def release(self, mean: Sequence[np.ndarray], contributors: int, sampled: int, population: int,
                expected: float, random_bytes: secagg.RandomBytes = os.urandom) -> Release:
        """The server's half: the sum of the contributors' clipped updates plus Gaussian noise."""
        sensitivity = secagg.central_sensitivity(self.cfg, self.dimension)
        z = self.cfg.user_dp.noise_multiplier
        std = z * sensitivity
        noisy_sum = [np.asarray(a) * contributors + secagg.gaussian(np.shape(a), std, random_bytes) for a in mean]
        return Release(noisy_sum, self.round_event(population, expected), z, 0.0, USER_LEVEL_SAMPLING, {
            "noise_mode": self.mode, "mechanism": "Gaussian", "sensitivity": sensitivity,
            "noise_std_on_sum": std, "clients_contributing": contributors,
        })

    def skipped(self, population: int, expected: float) -> Release:
        """A round skipped because too few clients were drawn, counted in full (skipping depends
        on the draw)."""
        return Release([], self.round_event(population, expected), self.cfg.user_dp.noise_multiplier, 0.0,
                       USER_LEVEL_SAMPLING, {"noise_mode": self.mode, "skipped": True})


class DistributedDiscreteGaussian(CentralGaussian):
    """Each client adds its share of discrete Gaussian noise to its scaled, rounded update before
    masking; the server decodes the exact integer sum SecAgg+ unmasks."""

    mode = "distributed"
    integers = True
    ASSUMPTIONS = (
        "each contributing client added discrete Gaussian noise of local_std to its integer "
        "update (scaled by scale, randomized rounding, L2 sensitivity clip*scale + sqrt(d), L1 "
        "sensitivity l1_sensitivity); the sum of the contributors' discrete Gaussians is "
        "zcdp_rho-zCDP by Kairouz, Liu and Steinke 2021 (Proposition 14, with their tau), "
        "accounted as ZCDpEvent(zcdp_rho) with no sampling amplification (one client's update "
        "zeroed out: its participation is visible through SecAgg+); the chance that a coordinate "
        "leaves the SecAgg+ range (delta_addition) is charged to delta; "
        "gaussian_approximation_noise_multiplier is the continuous-Gaussian approximation, "
        "for comparison only"
    )
    SUMMARY = (
        "DP-FedAvg with distributed discrete Gaussian noise (Kairouz et al. 2021): each client "
        "clips its update, rounds it to integers and adds its share of the noise before masking, "
        "so the server only sees noised sums; uniform client weights. Each round is accounted by "
        "Kairouz, Liu and Steinke's zCDP bound for the sum of discrete Gaussians (with their tau "
        "and rounding's effect on sensitivity), without amplification by client sampling, and "
        "the chance of a SecAgg+ range overflow is charged to delta; epsilon_gaussian_approximation "
        "is the continuous-Gaussian approximation with amplification, for comparison only. Each "
        "round's ledger entry records the noise that applied to the sum and what the accounting assumes."
    )

    def encode(self, update: Sequence[np.ndarray], clients_sampled: int,
               random_bytes: secagg.RandomBytes = os.urandom) -> tuple[list[np.ndarray], float]:
        """The client's half: clip, scale, round at random to integers and add this client's
        discrete Gaussian noise (all from ``random_bytes``, the OS CSPRNG by default)."""
        clipped, norm = secagg.clip_l2(update, self.cfg.user_dp.clipping_norm)
        plan = secagg.distributed_noise(self.cfg, self.dimension, clients_sampled)
        encoded = [
            (secagg.randomized_round(a * plan.scale, random_bytes)
             + secagg.discrete_gaussian(a.shape, plan.local_std, random_bytes)).astype(np.float64)
            for a in clipped
        ]
        return encoded, norm

    def bound_before_round(self, population: int, expected: float) -> tuple[dp_accounting.DpEvent, float]:
        return secagg.distributed_worst_round(self.cfg, self.dimension, population)

    def release(self, mean: Sequence[np.ndarray], contributors: int, sampled: int, population: int,
                expected: float, random_bytes: secagg.RandomBytes = os.urandom) -> Release:
        """The server's half: the exact integer sum (already noised by the clients), scaled back."""
        plan = secagg.distributed_noise(self.cfg, self.dimension, sampled)
        noisy_sum = secagg.decode_distributed_sum(mean, contributors, plan)
        parameters = {"noise_mode": self.mode, "mechanism": "distributed discrete Gaussian",
                      **plan.describe(contributors)}
        return Release(noisy_sum, plan.event(contributors), parameters["noise_multiplier"],
                       parameters["delta_addition"], "none", parameters)

    def skipped(self, population: int, expected: float) -> Release:
        event, addition = self.bound_before_round(population, expected)
        return Release([], event, accounting.equivalent_noise_multiplier(event), addition, "none", {
            "noise_mode": self.mode, "skipped": True, "delta_addition": addition,
            "gaussian_approximation_noise_multiplier": self.cfg.user_dp.noise_multiplier,
        })


MODES: dict[str, type[CentralGaussian]] = {m.mode: m for m in (CentralGaussian, DistributedDiscreteGaussian)}
ASSUMPTIONS = {mode: cls.ASSUMPTIONS for mode, cls in MODES.items()}
SUMMARIES = {mode: cls.SUMMARY for mode, cls in MODES.items()}


def noise_for(cfg: RunConfig, dimension: int) -> CentralGaussian | None:
    """The run's user-level noise mode for a model of ``dimension`` parameters (None without
    user-level DP)."""
    if not cfg.user_dp.enabled:
        return None
    return MODES[cfg.user_dp.noise_mode](cfg, dimension)
