"""Privacy accounting on dp-accounting: what was spent, as DpEvents, and epsilon from them.

A client's record-level spending is a list of :class:`DPSGDSpend` (sampling rate, effective noise
multiplier, number of steps). Each converts to a dp-accounting ``DpEvent``; epsilon is always
recomputed from the events by a fresh dp-accounting accountant, never kept as a running number.

Sampling: fedpriv's client trainer draws every batch by Poisson sampling (each record joins
independently with probability ``q``), so the event is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
per step -- what the accounting assumes is what the trainer does. The rate and the step count come
from :func:`dpsgd_schedule` on a *public* record count (``client.schedule_examples``), never on the
node's own: a node's spend is then a function of the run configuration alone, and declaring it to
the server reveals nothing about the node's data.

Microbatching: with ``k`` microbatches of more than one record, a record changes one microbatch
mean, and the clipped difference can have norm ``2C`` under add/remove adjacency, while the noise
is ``z * C``. The effective noise multiplier is therefore ``z / 2``; TF Privacy's
``compute_dp_sgd_privacy_statement(used_microbatching=True)`` makes the same adjustment.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
ENFORCEMENT_ACCOUNTANT = "rdp"  # the accountant every budget is enforced and audited with
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


def dpsgd_schedule(examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """The one DP-SGD schedule: sampling rate ``q = min(1, B / N)`` and ``E * ceil(N / B)`` steps
    for ``E`` epochs over ``N`` records with expected batch size ``B``."""
    if examples < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"no DP-SGD schedule for N={examples}, B={batch_size}, E={epochs}")
    return min(1.0, batch_size / examples), epochs * math.ceil(examples / batch_size)


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


def compact(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """The same composition with identical mechanisms grouped: ``SelfComposed(e, total)`` each.

    Composition is commutative, so this changes no epsilon; it lets the PLD accountant
    self-compose by repeated squaring instead of convolving round after round.
    """
    counts: dict[dp_accounting.DpEvent, int] = {}

    def add(e: dp_accounting.DpEvent, times: int) -> None:
        if isinstance(e, dp_accounting.SelfComposedDpEvent):
            add(e.event, times * e.count)
        elif isinstance(e, dp_accounting.ComposedDpEvent):
            for inner in e.events:
                add(inner, times)
        elif times > 0:
            counts[e] = counts.get(e, 0) + times

    add(event, 1)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(e, k) if k > 1 else e for e, k in counts.items()])


@functools.lru_cache(maxsize=4096)
def _rdp_curve(event: dp_accounting.DpEvent, relation: dp_accounting.NeighboringRelation) -> np.ndarray:
    """dp-accounting's RDP curve (over its default orders) of one mechanism, computed once.

    Ledgers repeat the same per-round mechanism many times; the curve of each distinct one is
    what costs time (tenths of a second), and composition just adds curves.
    """
    curve = rdp.RdpAccountant(neighboring_relation=relation).compose(event).rdp
    curve.flags.writeable = False  # shared by every caller of the cache
    return curve


def _counted(event: dp_accounting.DpEvent) -> list[tuple[dp_accounting.DpEvent, int]]:
    """(mechanism, count) pairs of a compacted event."""
    pairs = []
    for inner in event.events:
        if isinstance(inner, dp_accounting.SelfComposedDpEvent):
            pairs.append((inner.event, inner.count))
        else:
            pairs.append((inner, 1))
    return pairs


def _as_event(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    if isinstance(events, dp_accounting.DpEvent):
        return events
    return dp_accounting.ComposedDpEvent(list(events))


def _noiseless(event: dp_accounting.DpEvent) -> bool:
    """Whether a mechanism of ``event`` adds no noise at all (a Gaussian of multiplier 0)."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return event.noise_multiplier == 0
    inner = getattr(event, "event", None)
    if isinstance(inner, dp_accounting.DpEvent):
        return _noiseless(inner)
    return any(_noiseless(e) for e in getattr(event, "events", None) or [])


def make_accountant(accountant: str, sampling: str = "poisson") -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant: the only place fedpriv builds one."""
    relation = neighboring_relation(sampling)
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        return pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")


def analysable(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent],
               accountant: str = ENFORCEMENT_ACCOUNTANT, sampling: str = "poisson") -> bool:
    """Whether ``accountant`` can analyse ``events`` (dp-accounting's ``supports``)."""
    return make_accountant(accountant, sampling).supports(compact(_as_event(events)))


def epsilon(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
            accountant: str = ENFORCEMENT_ACCOUNTANT, sampling: str = "poisson") -> float:
    """The one epsilon policy: epsilon of ``events`` (one DpEvent or a list, composed) at
    ``delta`` by a fresh dp-accounting ``accountant``, under the neighbouring relation of
    ``sampling`` (add/remove-one, or replace-one for fixed-size sampling).

    It fails closed: an event the accountant cannot analyse, or a mechanism without noise, is
    infinite epsilon -- never zero, never skipped. Nothing spent is 0. Callers that must *say*
    why (the audit) ask :func:`analysable` as well.
    """
    event = compact(_as_event(events))
    if not event.events:
        return 0.0
    if _noiseless(event):
        return math.inf
    acc = make_accountant(accountant, sampling)
    if not acc.supports(event):
        return math.inf
    if isinstance(acc, rdp.RdpAccountant):
        relation = neighboring_relation(sampling)
        curve = sum(count * _rdp_curve(inner, relation) for inner, count in _counted(event))
        if np.all(np.isinf(curve)):
            return math.inf
        return float(rdp.compute_epsilon(acc.orders, curve, delta)[0])
    return float(acc.compose(event).get_epsilon(delta))


def epsilon_or_none(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
                    accountant: str, sampling: str = "poisson") -> float | None:
    """For reports beside the enforcement figure: :func:`epsilon`, or None where ``accountant``
    cannot analyse the event (PLD and fixed-size sampling without replacement, in dp-accounting
    0.6). The enforcement accountant never answers None: it fails closed to infinity."""
    if accountant != ENFORCEMENT_ACCOUNTANT and not analysable(events, accountant, sampling):
        return None
    return epsilon(events, delta, accountant, sampling)


def figures(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
            sampling: str = "poisson") -> dict[str, float | None]:
    """Epsilon by each accountant (see :func:`epsilon_or_none`), enforcement accountant first."""
    events = _as_event(events)
    return {name: epsilon_or_none(events, delta, name, sampling) for name in ACCOUNTANTS}


def record_level_epsilon(spends: Iterable[DPSGDSpend], delta: float,
                         accountant: str = ENFORCEMENT_ACCOUNTANT) -> float:
    """Cumulative record-level epsilon of everything in ``spends`` (0 when nothing was spent)."""
    return epsilon(composed_event(spends), delta, accountant)


# ---- user level (DP-FedAvg) and the calculator ------------------------------------------------
SAMPLING_SCHEMES = ("poisson", "fixed", "none")


def dpfedavg_round_event(
    noise_multiplier: float, population: int, clients_per_round: int, sampling: str
) -> dp_accounting.DpEvent:
    """One DP-FedAvg round: the Gaussian sum of clipped client updates, with client sampling.

    - ``poisson``: each client joins independently with q = clients_per_round / population
      (add/remove-one-client adjacency).
    - ``fixed``: exactly clients_per_round clients drawn without replacement (replace-one-client
      adjacency, the relation under which that sampling is analysed). Replacing one client can
      move a sum of updates clipped to C by 2C, and dp-accounting's noise multiplier is relative
      to that sensitivity, so the event carries ``noise_multiplier / 2``.
    - ``none``: no amplification; every round counts in full.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(clients_per_round / population, gaussian)
    if sampling == "fixed":
        replace_one = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        return dp_accounting.SampledWithoutReplacementDpEvent(population, clients_per_round, replace_one)
    if sampling == "none":
        return gaussian
    raise ValueError(f"unknown sampling {sampling!r}; use one of {SAMPLING_SCHEMES}")


def neighboring_relation(sampling: str) -> dp_accounting.NeighboringRelation:
    if sampling == "fixed":
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def dpsgd_event(examples: int, batch_size: int, epochs: int, noise_multiplier: float,
                microbatches: int = 0) -> dp_accounting.DpEvent:
    """All of a DP-SGD training run on ``examples`` records, Poisson-sampled, on the trainer's
    schedule (:func:`dpsgd_schedule`)."""
    q, steps = dpsgd_schedule(examples, batch_size, epochs)
    z = effective_noise_multiplier(noise_multiplier, microbatches, batch_size)
    return DPSGDSpend(q, z, steps).to_event()


def dpsgd_shuffle_epsilon(examples: int, batch_size: int, epochs: int, noise_multiplier: float,
                          delta: float, microbatches: int = 0) -> float:
    """The conservative figure without sampling amplification: each record is in exactly one
    batch per epoch, so every epoch is one full Gaussian release for it (TF Privacy's
    "each example occurring once per epoch")."""
    z = effective_noise_multiplier(noise_multiplier, microbatches, batch_size)
    return epsilon(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), epochs), delta)


def noise_for_target_epsilon(make_event: Any, target_epsilon: float, delta: float,
                             accountant: str = ENFORCEMENT_ACCOUNTANT, sampling: str = "poisson",
                             upper_bound: float | None = None) -> float:
    """Smallest noise multiplier (to within 1e-4) whose event stays within ``target_epsilon``.

    ``upper_bound``: a noise multiplier known to suffice (the RDP answer bounds the PLD one),
    which narrows the search -- each PLD evaluation of a long run takes seconds.
    """
    bracket: Any = dp_accounting.LowerEndpointAndGuess(0.05, 1.0)
    if upper_bound is not None:
        bracket = dp_accounting.ExplicitBracketInterval(upper_bound / 2, upper_bound)
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant, sampling), make_event, target_epsilon, delta,
            bracket_interval=bracket, tol=1e-4,
        ))
    except ValueError:
        if upper_bound is None:
            raise
        return noise_for_target_epsilon(make_event, target_epsilon, delta, accountant, sampling)
