"""User-level DP (DP-FedAvg) in one place: one object per noise mode.

As TF Privacy's ``DPQuery`` does, each mode is one object that does both halves of the mechanism
and accounts for what it did: :meth:`encode` is the client's half (clip the update and, in
distributed mode, scale, round and add this client's share of the noise before masking),
:meth:`release` the server's half (turn the mean SecAgg+ or FedAvg hands over into the noisy sum)
and returns, with the noisy sum, the round's ``DpEvent``, its delta addition and the parameters
the ledger records. :meth:`bound_before_round` bounds a round before its sample is known (the
budget check, a round skipped for too few clients).

- :class:`CentralGaussian` (``user_dp.noise_mode = "central"``): the server adds Gaussian noise;
  Poisson-sampled Gaussian accounting (add/remove-one-client adjacency). With
  ``user_dp.adaptive_clipping`` it also holds the clip, which each release moves toward a
  quantile of the update norms from a noisy count of unclipped updates (Andrew et al. 2021, as
  TF Privacy's ``QuantileAdaptiveClipSumQuery``); the round's event composes both Gaussians.
- :class:`DistributedDiscreteGaussian` (``"distributed"``): each client adds discrete Gaussian
  noise before masking; Kairouz, Liu and Steinke's zCDP bound, no sampling amplification, the
  SecAgg+ range-overflow probability charged to delta. With adaptive clipping the clipped-or-not
  value is one more integer coordinate with its own scale and its own discrete Gaussian noise,
  and the round's event composes the two zCDP bounds.

What each assumes is written into every ledger entry (``ASSUMPTIONS``) and explained in
docs/secure-aggregation.md, section "User-level DP". The SecAgg+ arithmetic both
modes rely on (samplers, quantization, the distributed plan) stays in :mod:`common.secagg`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fedpriv.common import accounting, secagg
from fedpriv.common.config import ADAPTIVE_BIT, RunConfig
from fedpriv.common.errors import ConfigError
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
        "divided by the expected count q * population, a fixed denominator; with adaptive clipping "
        "(next_clipping_norm recorded), clipping_norm is the round's clip and the round also releases "
        "the count of unclipped updates (each client's +-0.5, summed inside the masked vector) with "
        "Gaussian noise of clipped_count_stddev: two Gaussian mechanisms on the same sample, composed "
        "inside the Poisson sampling (sum_noise_multiplier, count_noise_multiplier)"
    )
    SUMMARY = (
        "DP-FedAvg: each client clips its update to clipping_norm before masking; the server adds "
        "Gaussian noise of std noise_multiplier * sensitivity to the unmasked sum, which is divided "
        "by the expected number of clients; uniform client weights; each client sampled "
        "independently with probability federation.fraction_train each round (add/remove-one-client "
        "adjacency)"
    )

    def __init__(self, cfg: RunConfig, dimension: int, clip: float | None = None) -> None:
        self.cfg, self.dimension = cfg, dimension
        # The round's clipping norm: user_dp.clipping_norm, or with adaptive clipping the clip the
        # server moved it to (release() moves it; a client gets it with the round's request).
        self.clip = float(cfg.user_dp.clipping_norm if clip is None else clip)
        self.adaptive = cfg.user_dp.adaptive_clipping

    def encode(self, update: Sequence[np.ndarray], clients_sampled: int,
               random_bytes: secagg.RandomBytes = os.urandom) -> tuple[list[np.ndarray], float]:
        """The client's half: clip to the round's clip; return the update and its norm before.
        With adaptive clipping the update gets one more array, last: whether it was left
        unclipped (+ADAPTIVE_BIT) or clipped (-ADAPTIVE_BIT), which SecAgg+ masks with the rest."""
        clipped, norm = secagg.clip_l2(update, self.clip)
        if self.adaptive:
            clipped.append(np.array([ADAPTIVE_BIT if norm <= self.clip else -ADAPTIVE_BIT]))
        return clipped, norm

    def split(self, arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
        """An update (or a sum of them) as clients send it -> (the model's arrays, the
        clipped-or-not array, None without adaptive clipping)."""
        return split_count(self.cfg, arrays)

    # ---- adaptive clipping (Andrew et al. 2021; TF Privacy's QuantileAdaptiveClipSumQuery) ----
    def count_sensitivity(self) -> float:
        """How much one client can move the count of unclipped updates (as the server unmasks it)."""
        step = secagg.quantization_step(self.cfg) if self.cfg.secure_aggregation.enabled else 0.0
        return ADAPTIVE_BIT + step

    def count_stddev(self, expected: float) -> float:
        return self.cfg.user_dp.clipped_count_stddev or expected / 20

    def multipliers(self, expected: float) -> tuple[float, float | None]:
        """(noise multiplier on the sum, on the count; None without adaptive clipping). The two
        compose to user_dp.noise_multiplier, z^-2 = z_sum^-2 + z_count^-2, as TensorFlow
        Federated splits it: adaptive clipping costs no epsilon, a little more noise on the sum."""
        z = self.cfg.user_dp.noise_multiplier
        if not self.adaptive:
            return z, None
        z_count = self.count_stddev(expected) / self.count_sensitivity()
        if z == 0:
            return 0.0, z_count
        if z_count <= z:
            raise ConfigError(
                f"adaptive clipping: the count's noise multiplier {z_count:.3g} (clipped_count_stddev "
                f"{self.count_stddev(expected):.3g} over sensitivity {self.count_sensitivity():g}) must be above "
                f"user_dp.noise_multiplier ({z:g}), which the two compose to; raise user_dp.clipped_count_stddev "
                f"above {z * self.count_sensitivity():.3g} (or sample more clients a round)")
        return (z ** -2 - z_count ** -2) ** -0.5, z_count

    def move_clip(self, noisy_count: float, expected: float) -> dict[str, Any]:
        """Move the clip (post-processing of the noisy count of unclipped updates, the sum of the
        clients' +-ADAPTIVE_BIT values): geometrically toward the target quantile, as TF Privacy's
        QuantileAdaptiveClipSumQuery with ``geometric_update``. Returns what the ledger records."""
        udp = self.cfg.user_dp
        unclipped = min(1.0, max(0.0, noisy_count / expected + ADAPTIVE_BIT))
        next_clip = self.clip * math.exp(-udp.clip_learning_rate * (unclipped - udp.target_quantile))
        self.clip = next_clip
        return {"unclipped_fraction": unclipped, "target_quantile": udp.target_quantile,
                "clip_learning_rate": udp.clip_learning_rate, "next_clipping_norm": next_clip}

    def round_event(self, population: int, expected: float, noise_multiplier: float | None = None
                    ) -> dp_accounting.DpEvent:
        z = self.cfg.user_dp.noise_multiplier if noise_multiplier is None else noise_multiplier
        if noise_multiplier is None and self.adaptive:
            z_sum, z_count = self.multipliers(expected)
            return accounting.dpfedavg_round_event(z_sum, population, expected, USER_LEVEL_SAMPLING, z_count)
        return accounting.dpfedavg_round_event(z, population, expected, USER_LEVEL_SAMPLING)

    def bound_before_round(self, population: int, expected: float) -> tuple[dp_accounting.DpEvent, float]:
        return self.round_event(population, expected), 0.0

    def release(self, mean: Sequence[np.ndarray], contributors: int, sampled: int, population: int,
                expected: float, random_bytes: secagg.RandomBytes = os.urandom,
                count: np.ndarray | None = None) -> Release:
        """The server's half: the sum of the contributors' clipped updates plus Gaussian noise.
        ``count``: with adaptive clipping, the mean of the clients' clipped-or-not values
        (:meth:`split`); its noisy sum moves the clip for the next round."""
        sensitivity = secagg.central_sensitivity(self.cfg, self.dimension, self.clip)
        z_sum, z_count = self.multipliers(expected)
        std = z_sum * sensitivity
        noisy_sum = [np.asarray(a) * contributors + secagg.gaussian(np.shape(a), std, random_bytes) for a in mean]
        parameters: dict[str, Any] = {
            "noise_mode": self.mode, "mechanism": "Gaussian", "sensitivity": sensitivity,
            "noise_std_on_sum": std, "clients_contributing": contributors, "clipping_norm": self.clip,
        }
        if self.adaptive:
            _check_count(count)
            count_std = self.count_stddev(expected)
            noisy_count = float(count[0]) * contributors + float(secagg.gaussian((1,), count_std, random_bytes)[0])
            parameters.update({
                "mechanism": "Gaussian sum and Gaussian count of unclipped updates (adaptive clipping)",
                "sum_noise_multiplier": z_sum, "count_noise_multiplier": z_count,
                "count_sensitivity": self.count_sensitivity(), "clipped_count_stddev": count_std,
                **self.move_clip(noisy_count, expected),
            })
        event = self.round_event(population, expected)
        return Release(noisy_sum, event, self.cfg.user_dp.noise_multiplier, 0.0, USER_LEVEL_SAMPLING, parameters)

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

    def count_sensitivity(self) -> float:
        """The clipped-or-not value is its own coordinate with its own integer plan (see
        :meth:`plans`): no SecAgg+ quantization step on it."""
        return ADAPTIVE_BIT

    def multipliers(self, expected: float | None = None) -> tuple[float, float | None]:
        """As in central mode, but from the run configuration alone (``expected`` is ignored):
        the clients size their noise with it, so client and server must agree without the
        server's word on how many clients it expects."""
        return super().multipliers(expected_clients(self.cfg))

    def plans(self, clients_sampled: int) -> tuple[secagg.DistributedNoise, secagg.DistributedNoise | None]:
        """The round's integer plans: the update's, at the round's clip, and with adaptive
        clipping the clipped-or-not value's (one coordinate of magnitude ADAPTIVE_BIT, its own
        scale and discrete Gaussian noise), each with its share of the noise multiplier."""
        z_sum, z_count = self.multipliers()
        update = secagg.distributed_noise(self.cfg, self.dimension, clients_sampled, self.clip, z_sum)
        if z_count is None:
            return update, None
        return update, secagg.distributed_noise(self.cfg, 1, clients_sampled, ADAPTIVE_BIT, z_count)

    def encode(self, update: Sequence[np.ndarray], clients_sampled: int,
               random_bytes: secagg.RandomBytes = os.urandom) -> tuple[list[np.ndarray], float]:
        """The client's half: clip, scale, round at random to integers and add this client's
        discrete Gaussian noise (all from ``random_bytes``, the OS CSPRNG by default). With
        adaptive clipping the clipped-or-not value goes last, encoded the same way with its own plan."""
        clipped, norm = secagg.clip_l2(update, self.clip)
        plan, count_plan = self.plans(clients_sampled)
        encoded = [_noised_integers(a, plan, random_bytes) for a in clipped]
        if count_plan is not None:
            value = np.array([ADAPTIVE_BIT if norm <= self.clip else -ADAPTIVE_BIT])
            encoded.append(_noised_integers(value, count_plan, random_bytes))
        return encoded, norm

    def bound_before_round(self, population: int, expected: float) -> tuple[dp_accounting.DpEvent, float]:
        z_sum, z_count = self.multipliers()
        event, addition = secagg.distributed_worst_round(self.cfg, self.dimension, population, z_sum)
        if z_count is None:
            return event, addition
        count_event, count_addition = secagg.distributed_worst_round(self.cfg, 1, population, z_count)
        return dp_accounting.ComposedDpEvent([event, count_event]), addition + count_addition

    def release(self, mean: Sequence[np.ndarray], contributors: int, sampled: int, population: int,
                expected: float, random_bytes: secagg.RandomBytes = os.urandom,
                count: np.ndarray | None = None) -> Release:
        """The server's half: the exact integer sum (already noised by the clients), scaled back.
        ``count``: with adaptive clipping, the mean of the clients' encoded clipped-or-not values;
        its decoded sum moves the clip, and the round's event composes the two zCDP bounds."""
        plan, count_plan = self.plans(sampled)
        noisy_sum = secagg.decode_distributed_sum(mean, contributors, plan)
        parameters = {"noise_mode": self.mode, "mechanism": "distributed discrete Gaussian",
                      **plan.describe(contributors)}
        event = plan.event(contributors)
        if count_plan is not None:
            _check_count(count)
            noisy_count = float(secagg.decode_distributed_sum([count], contributors, count_plan)[0][0])
            counted = count_plan.describe(contributors)
            rho = parameters["zcdp_rho"] + counted["zcdp_rho"]
            approximation = _composed_multiplier(parameters["gaussian_approximation_noise_multiplier"],
                                                 counted["gaussian_approximation_noise_multiplier"])
            event = dp_accounting.ComposedDpEvent([event, count_plan.event(contributors)])
            z_sum, z_count = self.multipliers()
            parameters.update({
                "mechanism": "distributed discrete Gaussian sum and count of unclipped updates (adaptive clipping)",
                "sum_noise_multiplier": z_sum, "count_noise_multiplier": z_count,
                "sum_zcdp_rho": parameters["zcdp_rho"], "count_zcdp_rho": counted["zcdp_rho"], "zcdp_rho": rho,
                "noise_multiplier": accounting.equivalent_noise_multiplier(event),
                "gaussian_approximation_noise_multiplier": approximation,
                "count_scale": counted["scale"], "count_sensitivity": counted["sensitivity"],
                "count_local_std": counted["local_std"], "count_tau": counted["tau"],
                "clipped_count_stddev": self.count_stddev(expected_clients(self.cfg)),
                "overflow_probability_bound": parameters["delta_addition"] + counted["delta_addition"],
                "delta_addition": parameters["delta_addition"] + counted["delta_addition"],
                **self.move_clip(noisy_count, expected),
            })
        return Release(noisy_sum, event, parameters["noise_multiplier"], parameters["delta_addition"], "none",
                       parameters)

    def skipped(self, population: int, expected: float) -> Release:
        event, addition = self.bound_before_round(population, expected)
        return Release([], event, accounting.equivalent_noise_multiplier(event), addition, "none", {
            "noise_mode": self.mode, "skipped": True, "delta_addition": addition,
            "gaussian_approximation_noise_multiplier": self.cfg.user_dp.noise_multiplier,
        })


def _noised_integers(values: np.ndarray, plan: secagg.DistributedNoise,
                     random_bytes: secagg.RandomBytes) -> np.ndarray:
    """A client's clipped ``values`` as SecAgg+ sums them in distributed mode: scaled, rounded at
    random to integers, plus this client's discrete Gaussian noise."""
    return (secagg.randomized_round(values * plan.scale, random_bytes)
            + secagg.discrete_gaussian(values.shape, plan.local_std, random_bytes)).astype(np.float64)


def _composed_multiplier(*multipliers: float) -> float:
    """The one Gaussian noise multiplier with the RDP curve of Gaussians of ``multipliers`` on the
    same sample composed: z^-2 = sum of z_i^-2 (0 when any part has no noise)."""
    if any(z <= 0 for z in multipliers):
        return 0.0
    inverse = math.fsum(z ** -2 for z in multipliers)
    return inverse ** -0.5 if inverse > 0 else math.inf


def _check_count(count: np.ndarray | None) -> None:
    if count is None or np.shape(count) != (1,):
        raise ValueError("adaptive clipping needs the clients' clipped-or-not count")


def expected_clients(cfg: RunConfig) -> float:
    """The clients a round is expected to sample, from the run configuration: q * num_clients."""
    return cfg.federation.fraction_train * cfg.federation.num_clients


def preflight_warnings(cfg: RunConfig, dimension: int) -> list[str]:
    """Before any round, for a model of ``dimension`` parameters: the warnings about the run's
    privacy settings (SecAgg+ quantization, :func:`common.secagg.precision_warnings`, and
    user-level DP). Raises ConfigError where the settings cannot work."""
    warnings = secagg.precision_warnings(cfg, dimension)
    noise = noise_for(cfg, dimension)
    if noise is None:
        return warnings
    expected = expected_clients(cfg)
    if noise.adaptive:
        noise.multipliers(expected)  # (raises where the count's noise cannot compose to noise_multiplier)
    ratio = noise_to_signal(cfg, dimension)
    if ratio > NO_SIGNAL_RATIO:
        udp = cfg.user_dp
        warnings.append(
            f"user-level noise leaves no signal: over the run's {cfg.run.rounds} rounds the noise on the "
            f"averaged updates is {ratio:.1f}x the most the updates themselves can add up to (noise of "
            f"L2 norm about {udp.noise_multiplier:g} x clip x sqrt({dimension:,} parameters) / {expected:g} "
            f"expected clients a round, against at most the clip a round); sample more clients a round "
            f"or allow more epsilon (a lower user_dp.noise_multiplier)")
    return warnings


NO_SIGNAL_RATIO = 2.0  # noise_to_signal() above this: the run's noise outweighs its updates twice over


def noise_to_signal(cfg: RunConfig, dimension: int) -> float:
    """How far user-level noise outweighs the updates over a whole run, in L2: the noise added to
    the model over ``run.rounds`` rounds, ``z * C * sqrt(d) / m`` a round on the mean of ``m``
    expected clients' updates (independent rounds: times sqrt(rounds)), over the most the mean
    updates can add up to, ``C`` a round (times rounds). The clip cancels:
    ``z * sqrt(d) / (m * sqrt(rounds))``. Above :data:`NO_SIGNAL_RATIO` no round's update, and no
    run's sum of them, stands out from the noise (the quickstart with user-level DP, 10 clients
    at z = 1 for 20 rounds on its 93,322-parameter CNN: 6.8, and its accuracy stays near chance;
    the cross-device preset, about 100 clients a round for 20 rounds at z = 1.21: 0.8, and it learns)."""
    m = expected_clients(cfg)
    return cfg.user_dp.noise_multiplier * math.sqrt(dimension) / (m * math.sqrt(cfg.run.rounds))


def split_count(cfg: RunConfig, arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Arrays as clients send them -> (the model's arrays, the clipped-or-not array last in them
    with adaptive clipping, else None; None too when there are no arrays)."""
    if not (cfg.user_dp.enabled and cfg.user_dp.adaptive_clipping) or not len(arrays):
        return list(arrays), None
    return list(arrays[:-1]), np.asarray(arrays[-1])


def count_problem(cfg: RunConfig, value: np.ndarray | None) -> str | None:
    """Why one client's clipped-or-not array (adaptive clipping) is malformed, or None: one
    number, +-ADAPTIVE_BIT (central mode), or one finite integer (distributed mode, where it is
    already scaled and noised)."""
    if value is None or np.shape(value) != (1,):
        return "the clipped-or-not value must be one number"
    number = float(np.asarray(value).ravel()[0])
    if secagg.distributed(cfg):
        if not (math.isfinite(number) and number == round(number)):
            return "the clipped-or-not value must be one finite integer (distributed noise)"
        return None
    if abs(number) != ADAPTIVE_BIT:
        return f"the clipped-or-not value must be one number, +-{ADAPTIVE_BIT}"
    return None


MODES: dict[str, type[CentralGaussian]] = {m.mode: m for m in (CentralGaussian, DistributedDiscreteGaussian)}
ASSUMPTIONS = {mode: cls.ASSUMPTIONS for mode, cls in MODES.items()}
SUMMARIES = {mode: cls.SUMMARY for mode, cls in MODES.items()}


def noise_for(cfg: RunConfig, dimension: int, clip: float | None = None) -> CentralGaussian | None:
    """The run's user-level noise mode for a model of ``dimension`` parameters (None without
    user-level DP); ``clip``: the round's clipping norm (adaptive clipping), default
    user_dp.clipping_norm."""
    if not cfg.user_dp.enabled:
        return None
    return MODES[cfg.user_dp.noise_mode](cfg, dimension, clip)
