"""Privacy accounting on dp-accounting: what was spent, as DpEvents, and epsilon from them.

A client's record-level spending is a list of :class:`DPSGDSpend` (sampling rate, effective noise
multiplier, number of steps). Each converts to a dp-accounting ``DpEvent``; epsilon is always
recomputed from the events by a fresh dp-accounting accountant, never kept as a running number.

Sampling: fedpriv's client trainer draws every batch by Poisson sampling (each record joins
independently with probability ``q = batch_size / n_local``), so the event is
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per step -- what the accounting assumes is what
the trainer does.

Microbatching: with ``k`` microbatches of more than one record, a record changes one microbatch
mean, and the clipped difference can have norm ``2C`` under add/remove adjacency, while the noise
is ``z * C``. The effective noise multiplier is therefore ``z / 2``; TF Privacy's
``compute_dp_sgd_privacy_statement(used_microbatching=True)`` makes the same adjustment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class DPSGDSpend:
    """``steps`` Poisson-sampled Gaussian steps at rate ``sampling_probability``."""

    sampling_probability: float
    noise_multiplier: float  # effective: already halved for microbatching
    steps: int

    def to_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_probability, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DPSGDSpend:
        return cls(float(raw["sampling_probability"]), float(raw["noise_multiplier"]), int(raw["steps"]))


def effective_noise_multiplier(noise_multiplier: float, microbatches: int, batch_size: int) -> float:
    """Noise multiplier relative to the true sensitivity of one record (see module docstring)."""
    records_per_microbatch = batch_size / microbatches if microbatches else 1
    return noise_multiplier / 2 if records_per_microbatch > 1 else noise_multiplier


def merge_spends(spends: Iterable[DPSGDSpend]) -> list[DPSGDSpend]:
    """Combine spends with the same rate and noise; composition only depends on the step count."""
    totals: dict[tuple[float, float], int] = {}
    for spend in spends:
        key = (spend.sampling_probability, spend.noise_multiplier)
        totals[key] = totals.get(key, 0) + spend.steps
    return [DPSGDSpend(q, z, steps) for (q, z), steps in totals.items() if steps > 0]


def composed_event(spends: Iterable[DPSGDSpend]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([s.to_event() for s in merge_spends(spends)])


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``event`` at ``delta`` from a fresh dp-accounting accountant."""
    if accountant == "rdp":
        acc: dp_accounting.PrivacyAccountant = rdp.RdpAccountant()
    elif accountant == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def record_level_epsilon(spends: Iterable[DPSGDSpend], delta: float, accountant: str = "rdp") -> float:
    """Cumulative record-level epsilon of everything in ``spends`` (0 when nothing was spent)."""
    merged = merge_spends(spends)
    if not merged:
        return 0.0
    if any(s.noise_multiplier == 0 for s in merged):
        return math.inf
    return epsilon(composed_event(merged), delta, accountant)
