"""Client updates under Flower's SecAgg+, and the noise user-level DP adds to them.

Flower's SecAgg+ (``secaggplus_mod`` on clients, ``SecAggPlusWorkflow`` on the server) clips each
coordinate of a client's vector to ``[-clipping_range, clipping_range]``, quantizes it to
``quantization_range`` levels with stochastic rounding, masks it, and sums the masked vectors
modulo 2^32; the server only ever unmasks the sum. This module holds what both sides of fedpriv
must agree on around that protocol:

- **central** noise: clients clip their update to L2 norm ``C`` and send it as floats; the server
  adds Gaussian noise to the unmasked sum. Flower's stochastic rounding moves each coordinate by
  less than one quantization step ``g``, so the sensitivity of the sum is at most
  ``C + g * sqrt(d)`` for ``d`` parameters, and the server's noise is sized to that bound.
- **distributed** noise (the distributed discrete Gaussian of Kairouz, Liu and Steinke, ICML 2021):
  each client scales its clipped update by ``s``, rounds it to integers with unbiased randomized
  rounding (which moves it by less than ``sqrt(d)`` in L2), and adds discrete Gaussian noise of
  standard deviation ``sigma`` before masking. The integers pass through Flower's quantizer
  unchanged (``clipping_range = quantization_range / 2``), so the unmasked result is exactly
  the integer sum, which carries the noise of every client that contributed.

All noise and randomized rounding here draws from the operating system's CSPRNG
(``os.urandom``); tests pass a seeded byte source instead.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from fedpriv.common import accounting
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError
from fedpriv.common.secagg_masks import GENERATOR

T = TypeVar("T")

RandomBytes = Callable[[int], bytes]
MODULUS = 2**32  # Flower's SecAgg+ masking modulus (its default modulus_range)
OVERFLOW_SIGMAS = 10.0  # headroom, in local noise standard deviations, before a coordinate clips
MAX_ROUNDING_INFLATION = 0.10  # refuse settings where rounding adds more than this to sensitivity
WARN_ROUNDING_INFLATION = 0.01


# ---- CSPRNG-backed samplers ----------------------------------------------------------------
def uniform(size: int, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """``size`` uniform draws in (0, 1] with 53 random bits each."""
    raw = np.frombuffer(random_bytes(8 * size), dtype=np.uint64, count=size)
    return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def choose(items: Iterable[T], k: int) -> list[T]:
    """``k`` of ``items`` uniformly without replacement (a fixed-size client sample), drawn from
    the OS CSPRNG (Flower's own sampling uses Python's Mersenne Twister)."""
    return random.SystemRandom().sample(list(items), k)


def gaussian(shape: Sequence[int], std: float, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """Gaussian noise (Box-Muller on CSPRNG uniforms)."""
    size = int(np.prod(shape, dtype=np.int64))
    u1, u2 = uniform(size, random_bytes), uniform(size, random_bytes)
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (std * normal).reshape(shape)


def discrete_gaussian(shape: Sequence[int], sigma: float, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """Discrete Gaussian N_Z(0, sigma^2) by rejection from a discrete Laplace proposal
    (Canonne, Kamath and Steinke 2020, Algorithm 3), vectorized in float64 arithmetic."""
    size = int(np.prod(shape, dtype=np.int64))
    out = np.zeros(size, dtype=np.int64)
    if sigma <= 0 or size == 0:
        return out.reshape(shape)
    t = math.floor(sigma) + 1
    pending = np.arange(size)
    while pending.size:
        n = pending.size
        # Difference of two geometric variables, P(G >= k) = exp(-k / t): discrete Laplace(t).
        g1 = np.floor(-t * np.log(uniform(n, random_bytes)))
        g2 = np.floor(-t * np.log(uniform(n, random_bytes)))
        y = g1 - g2
        accept = uniform(n, random_bytes) <= np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out[pending[accept]] = y[accept].astype(np.int64)
        pending = pending[~accept]
    return out.reshape(shape)


def randomized_round(x: np.ndarray, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """Round each value up with probability equal to its fractional part (unbiased)."""
    floor = np.floor(x)
    up = uniform(x.size, random_bytes).reshape(x.shape) <= (x - floor)
    return (floor + up).astype(np.int64)


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The joint L2 norm of ``arrays`` (in float64)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def clip_l2(arrays: Sequence[np.ndarray], bound: float) -> tuple[list[np.ndarray], float]:
    """Scale ``arrays`` jointly to L2 norm at most ``bound``; return them and the norm before."""
    norm = l2_norm(arrays)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return [np.asarray(a, dtype=np.float64) * factor for a in arrays], norm


# ---- what client and server agree on -------------------------------------------------------
def quantization_step(cfg: RunConfig) -> float:
    sa = cfg.secure_aggregation
    return 2 * sa.clipping_range / sa.quantization_range


def flower_clipping_range(cfg: RunConfig) -> float:
    """The clipping_range handed to Flower: in distributed mode, half the quantization range,
    so that integers pass through its quantizer unchanged."""
    if distributed(cfg):
        return float(cfg.secure_aggregation.quantization_range // 2)
    return cfg.secure_aggregation.clipping_range


def uniform_weights(cfg: RunConfig) -> bool:
    """Whether every client's update weighs 1 in the average: with user-level DP (bounded
    sensitivity) and with record-level DP (a weight from the node's example count would be an
    un-noised statistic of its data, and every node runs the same public schedule anyway)."""
    return cfg.user_dp.enabled or cfg.dp.enabled


def client_weight(cfg: RunConfig, num_examples: int) -> int:
    """A client's FedAvg weight (``FitRes.num_examples``): 1 under :func:`uniform_weights`, else its
    example count, capped at secure_aggregation.max_weight under SecAgg+ (where the weight travels
    only inside the masked vector)."""
    if uniform_weights(cfg):
        return 1
    if cfg.secure_aggregation.enabled:
        return min(num_examples, cfg.secure_aggregation.max_weight)
    return num_examples


def flower_max_weight(cfg: RunConfig) -> float:
    """The cap handed to Flower's SecAgg+: 1 under :func:`uniform_weights`, else max_weight."""
    return 1.0 if uniform_weights(cfg) else float(cfg.secure_aggregation.max_weight)


def distributed(cfg: RunConfig) -> bool:
    return cfg.user_dp.enabled and cfg.user_dp.noise_mode == "distributed"


def tolerated_dropouts(cfg: RunConfig) -> int:
    shares, threshold = cfg.secagg_shares()
    return shares - threshold if cfg.secure_aggregation.enabled else 0


def central_sensitivity(cfg: RunConfig, dimension: int, clip: float | None = None) -> float:
    """L2 sensitivity of the sum of updates clipped to ``clip`` (default user_dp.clipping_norm) as
    the server unmasks it (central mode): under SecAgg+, plus one quantization step per coordinate."""
    clip = cfg.user_dp.clipping_norm if clip is None else clip
    if not cfg.secure_aggregation.enabled:
        return clip
    return clip + quantization_step(cfg) * math.sqrt(dimension)


@dataclass(frozen=True)
class DistributedNoise:
    """Distributed discrete Gaussian parameters for one round (integer domain).

    ``scale`` turns a clipped float update into integers; ``sensitivity`` bounds the L2 norm of
    one client's rounded integer vector (``clip * scale + sqrt(d)``); each client adds discrete
    Gaussian noise of ``local_std``, sized so that the ``min_clients`` who survive the worst
    tolerated dropout still put ``noise_multiplier * sensitivity`` on the sum.
    """

    dimension: int
    clients_sampled: int
    min_clients: int
    clipping_norm: float
    noise_multiplier: float
    scale: float
    sensitivity: float
    local_std: float
    range_half_width: int

    def noise_multiplier_applied(self, contributors: int) -> float:
        """Noise std on the sum of ``contributors`` vectors, relative to the sensitivity: the
        Gaussian approximation's noise multiplier (not what the accounting uses)."""
        return self.local_std * math.sqrt(contributors) / self.sensitivity

    @property
    def l1_sensitivity(self) -> float:
        """L1 bound on one client's rounded integer vector: ``sqrt(d)`` times the L2 bound, and
        for integers also the squared L2 bound (``|v_i| <= v_i^2``)."""
        return self.sensitivity * min(math.sqrt(self.dimension), self.sensitivity)

    def tau(self, contributors: int) -> float:
        """Kairouz et al.'s bound on how far a sum of discrete Gaussians is from one."""
        return accounting.ddg_tau(self.local_std, contributors)

    def rho(self, contributors: int) -> float:
        """The round's rho-zCDP (Kairouz, Liu and Steinke 2021, Proposition 14)."""
        return accounting.ddg_rho(self.sensitivity, self.l1_sensitivity, self.local_std, contributors,
                                  self.dimension)

    def overflow_bound(self, contributors: int) -> float:
        """Union bound on the chance that any coordinate of any contributor leaves Flower's
        quantizer range [-range_half_width, range_half_width], where it would be clipped.

        A rounded coordinate has magnitude at most ``clip * scale + 1``, so it leaves the range
        only if its noise exceeds the rest of the range; the discrete Gaussian's subgaussian
        tail bounds that chance. (A wrap of the sum modulo 2^32 is post-processing of the sum
        and costs no privacy.)"""
        headroom = self.range_half_width - (self.clipping_norm * self.scale + 1)
        return min(1.0, contributors * self.dimension * accounting.discrete_gaussian_tail(headroom, self.local_std))

    def event(self, contributors: int) -> Any:
        """The round's DpEvent: ``ZCDpEvent(rho)``, with no sampling amplification."""
        return accounting.distributed_dgauss_event(self.rho(contributors))

    def describe(self, contributors: int) -> dict[str, Any]:
        rho = self.rho(contributors)
        return {
            **asdict(self),
            "clients_contributing": contributors,
            "noise_std_on_sum": self.local_std * math.sqrt(contributors),
            "l1_sensitivity": self.l1_sensitivity,
            "tau": self.tau(contributors),
            "zcdp_rho": rho,
            # the Gaussian with the same RDP curve: what the accounting composes
            "noise_multiplier": 1 / math.sqrt(2 * rho) if rho > 0 else math.inf,
            "gaussian_approximation_noise_multiplier": self.noise_multiplier_applied(contributors),
            "overflow_probability_bound": self.overflow_bound(contributors),
            "delta_addition": self.overflow_bound(contributors),
        }


def distributed_worst_round(cfg: RunConfig, dimension: int, population: int,
                            noise_multiplier: float | None = None) -> tuple[Any, float]:
    """Before a round is sampled: (DpEvent, delta addition) that bound any distributed round over
    ``population`` clients in which at least ``min_clients`` contribute. The bound is
    non-decreasing in the sensitivity-to-noise ratios (at most 1/z in L2 when at least
    min_clients contribute) and in tau (largest with everyone sampled and contributing).
    ``noise_multiplier``: as for :func:`distributed_noise`."""
    # the smallest local noise of any sample
    plan = distributed_noise(cfg, dimension, population, noise_multiplier=noise_multiplier)
    # Every plan keeps OVERFLOW_SIGMAS local standard deviations of headroom (or more).
    overflow = min(1.0, population * dimension * accounting.discrete_gaussian_tail(OVERFLOW_SIGMAS, 1.0))
    z = plan.noise_multiplier
    if z <= 0 or plan.local_std < accounting.DDG_MIN_LOCAL_STD:
        return accounting.distributed_dgauss_event(math.inf), overflow
    l2_scale = 1 / z
    l1_scale = l2_scale * plan.l1_sensitivity / plan.sensitivity
    rho = accounting.ddg_rho_from_scales(l2_scale, l1_scale, plan.tau(population), dimension)
    return accounting.distributed_dgauss_event(rho), overflow


def decode_distributed_sum(mean: Sequence[np.ndarray], contributors: int, plan: DistributedNoise) -> list[np.ndarray]:
    """The server's side of distributed mode: SecAgg+ unmasks the mean of the contributors'
    integer vectors; recover their exact integer sum and scale it back to update units."""
    return [np.rint(np.asarray(a, dtype=np.float64) * contributors) / plan.scale for a in mean]


def distributed_noise(cfg: RunConfig, dimension: int, clients_sampled: int, clip: float | None = None,
                      noise_multiplier: float | None = None) -> DistributedNoise:
    """The plan both sides compute from the configuration, the model size and the round's sample.
    ``clip``: the round's clipping norm (default user_dp.clipping_norm; adaptive clipping moves
    it, and only ``scale`` follows: the integer sensitivity, the noise and the accounting do
    not depend on it); ``noise_multiplier``: default user_dp.noise_multiplier (adaptive clipping
    plans the sum and the clipped-or-not count each with its share)."""
    sa = cfg.secure_aggregation
    half = sa.quantization_range // 2
    min_clients = max(1, clients_sampled - tolerated_dropouts(cfg))
    z = cfg.user_dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    clip = cfg.user_dp.clipping_norm if clip is None else clip
    # Keep |coordinate| <= half with OVERFLOW_SIGMAS of headroom for the local noise:
    # sensitivity * (1 + OVERFLOW_SIGMAS * z / sqrt(min_clients)) <= half.
    sensitivity = half / (1 + OVERFLOW_SIGMAS * z / math.sqrt(min_clients))
    rounding = math.sqrt(dimension)
    if sensitivity <= rounding * (1 + 1 / MAX_ROUNDING_INFLATION):
        raise ConfigError(
            f"secure_aggregation.quantization_range ({sa.quantization_range}) is too small for "
            f"distributed noise on a model of {dimension:,} parameters: integer rounding would add "
            f"more than {MAX_ROUNDING_INFLATION:.0%} to the sensitivity; raise it (or sample "
            f"fewer clients per round)"
        )
    scale = (sensitivity - rounding) / clip
    local_std = z * sensitivity / math.sqrt(min_clients)
    return DistributedNoise(
        dimension=dimension, clients_sampled=clients_sampled, min_clients=min_clients,
        clipping_norm=clip, noise_multiplier=z, scale=scale, sensitivity=sensitivity,
        local_std=local_std, range_half_width=half,
    )


def precision_warnings(cfg: RunConfig, dimension: int) -> list[str]:
    """Warnings about quantization for a model of ``dimension`` parameters (empty if fine).

    Raises ConfigError when distributed noise cannot be made rigorous at these settings.
    """
    sa = cfg.secure_aggregation
    if not sa.enabled:
        return []
    warnings = []
    if distributed(cfg):
        plan = distributed_noise(cfg, dimension, cfg.clients_per_round())
        inflation = math.sqrt(dimension) / (plan.sensitivity - math.sqrt(dimension))
        if inflation > WARN_ROUNDING_INFLATION:
            warnings.append(
                f"integer rounding adds {inflation:.1%} to the sensitivity of a {dimension:,}-parameter "
                f"update; raise secure_aggregation.quantization_range for more precision"
            )
        return warnings
    rounding = quantization_step(cfg) * math.sqrt(dimension)
    if cfg.user_dp.enabled:
        if rounding > WARN_ROUNDING_INFLATION * cfg.user_dp.clipping_norm:
            warnings.append(
                f"SecAgg+ quantization can move a {dimension:,}-parameter update by up to "
                f"{rounding:.3g} in L2, {rounding / cfg.user_dp.clipping_norm:.1%} of "
                f"user_dp.clipping_norm (noise is sized to include it); raise "
                f"secure_aggregation.quantization_range or lower clipping_range"
            )
        if sa.clipping_range < cfg.user_dp.clipping_norm:
            warnings.append(
                "secure_aggregation.clipping_range is below user_dp.clipping_norm: large update "
                "coordinates will be clipped (privacy is unaffected; accuracy may suffer)"
            )
    elif rounding > 0.1:
        warnings.append(
            f"SecAgg+ quantization can move a {dimension:,}-parameter update by up to {rounding:.3g} "
            f"in L2 (step {quantization_step(cfg):.3g} per coordinate); raise "
            f"secure_aggregation.quantization_range or lower clipping_range"
        )
    return warnings


def settings_summary(cfg: RunConfig, dimension: int | None = None) -> dict[str, Any]:
    """The secure-aggregation settings as a run reports them."""
    sa = cfg.secure_aggregation
    out: dict[str, Any] = {"enabled": sa.enabled}
    if not sa.enabled:
        return out
    shares, threshold = cfg.secagg_shares()
    out.update({
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)",
        "mask_generator": GENERATOR,
        "public_keys": "signed by each node, checked against the federation's signed roster",
        "num_shares": shares,
        "reconstruction_threshold": threshold,
        "tolerated_dropouts": tolerated_dropouts(cfg),
        "clipping_range": flower_clipping_range(cfg),
        "quantization_range": sa.quantization_range,
        "modulus_range": MODULUS,
        "max_weight": flower_max_weight(cfg),
        "timeout_s": sa.timeout,
    })
    if dimension is not None:
        out["model_parameters"] = dimension
    return out
