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

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from fedpriv.common.lazy import lazy_import

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

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
    # Keyed by repr: it holds every parameter, and a mechanism with a list inside (a sampled
    # composition: adaptive clipping's sum and count) is not hashable.
    counts: dict[str, tuple[dp_accounting.DpEvent, int]] = {}

    def add(e: dp_accounting.DpEvent, times: int) -> None:
        if isinstance(e, dp_accounting.SelfComposedDpEvent):
            add(e.event, times * e.count)
        elif isinstance(e, dp_accounting.ComposedDpEvent):
            for inner in e.events:
                add(inner, times)
        elif times > 0:
            known, k = counts.get(repr(e), (e, 0))
            counts[repr(e)] = (known, k + times)

    add(event, 1)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(e, k) if k > 1 else e for e, k in counts.values()])


def _rdp_curve(event: dp_accounting.DpEvent, relation: dp_accounting.NeighboringRelation) -> np.ndarray:
    """dp-accounting's RDP curve (over its default orders) of one mechanism, computed once.

    Ledgers repeat the same per-round mechanism many times; the curve of each distinct one is
    what costs time (tenths of a second), and composition just adds curves.
    """
    key = (repr(event), relation)
    curve = _RDP_CURVES.get(key)
    if curve is None:
        curve = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation).compose(event).rdp
        curve.flags.writeable = False  # shared by every caller of the cache
        if len(_RDP_CURVES) >= 4096:
            _RDP_CURVES.clear()
        _RDP_CURVES[key] = curve
    return curve


_RDP_CURVES: dict[tuple[str, dp_accounting.NeighboringRelation], np.ndarray] = {}


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
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")


def analysable(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent],
               accountant: str = ENFORCEMENT_ACCOUNTANT, sampling: str = "poisson") -> bool:
    """Whether ``accountant`` can analyse ``events`` (dp-accounting's ``supports``)."""
    return make_accountant(accountant, sampling).supports(compact(_as_event(events)))


def epsilon(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
            accountant: str = ENFORCEMENT_ACCOUNTANT, sampling: str = "poisson",
            additions: Iterable[float] = ()) -> float:
    """The one epsilon policy: epsilon of ``events`` (one DpEvent or a list, composed) at
    ``delta`` by a fresh dp-accounting ``accountant``, under the neighbouring relation of
    ``sampling`` (add/remove-one, or replace-one for fixed-size sampling), with ``additions``
    (failure probabilities, e.g. a distributed round's SecAgg+ range overflow) charged to
    ``delta`` first (:func:`charged_delta`).

    It fails closed: an event the accountant cannot analyse, a mechanism without noise, or
    additions that leave nothing of ``delta`` is infinite epsilon -- never zero, never skipped.
    Nothing spent is 0. Callers that must *say* why (the audit) ask :func:`analysable` as well.
    """
    event = compact(_as_event(events))
    if not event.events:
        return 0.0
    delta = charged_delta(delta, additions)
    if not delta > 0:
        return math.inf
    if _noiseless(event):
        return math.inf
    # Clients on one schedule spend identical events: each distinct question is answered once
    # per process (a PLD composition takes up to seconds). The key is exact: a DpEvent's repr
    # holds every parameter, floats in their shortest round-tripping form.
    key = (repr(event), delta, accountant, sampling)
    answer = _EPSILONS.get(key)
    if answer is None:
        answer = _accountant_epsilon(event, delta, accountant, sampling)
        if len(_EPSILONS) >= 4096:
            _EPSILONS.clear()
        _EPSILONS[key] = answer
    return answer


_EPSILONS: dict[tuple[str, float, str, str], float] = {}


def _accountant_epsilon(event: dp_accounting.ComposedDpEvent, delta: float, accountant: str, sampling: str) -> float:
    acc = make_accountant(accountant, sampling)
    if not acc.supports(event):
        return math.inf
    if isinstance(acc, dp_accounting.rdp.RdpAccountant):
        relation = neighboring_relation(sampling)
        curve = sum(count * _rdp_curve(inner, relation) for inner, count in _counted(event))
        if np.all(np.isinf(curve)):
            return math.inf
        return float(dp_accounting.rdp.compute_epsilon(acc.orders, curve, delta)[0])
    return float(acc.compose(event).get_epsilon(delta))


def privacy_profile(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], epsilons: Iterable[float],
                    sampling: str = "poisson") -> np.ndarray:
    """delta(epsilon) of ``events`` at each of ``epsilons``, by dp-accounting's PLD accountant
    (the empirical audit tests this whole profile, not one point of it). Infinite events (none
    the accountant can analyse, or no noise) give delta 1 everywhere: they claim nothing."""
    grid = [float(e) for e in epsilons]
    event = compact(_as_event(events))
    acc = make_accountant("pld", sampling)
    if not event.events:
        return np.zeros(len(grid))
    if _noiseless(event) or not acc.supports(event):
        return np.ones(len(grid))
    acc.compose(event)
    return np.array([min(1.0, float(acc.get_delta(e))) for e in grid])


def epsilon_or_none(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
                    accountant: str, sampling: str = "poisson", additions: Iterable[float] = ()) -> float | None:
    """For reports beside the enforcement figure: :func:`epsilon`, or None where ``accountant``
    cannot analyse the event (PLD and fixed-size sampling without replacement, in dp-accounting
    0.6). The enforcement accountant never answers None: it fails closed to infinity."""
    if accountant != ENFORCEMENT_ACCOUNTANT and not analysable(events, accountant, sampling):
        return None
    return epsilon(events, delta, accountant, sampling, additions)


def figures(events: dp_accounting.DpEvent | Iterable[dp_accounting.DpEvent], delta: float,
            sampling: str = "poisson", additions: Iterable[float] = ()) -> dict[str, float | None]:
    """Epsilon by each accountant (see :func:`epsilon_or_none`), enforcement accountant first."""
    events, additions = _as_event(events), list(additions)
    return {name: epsilon_or_none(events, delta, name, sampling, additions) for name in ACCOUNTANTS}


def record_level_epsilon(spends: Iterable[DPSGDSpend], delta: float,
                         accountant: str = ENFORCEMENT_ACCOUNTANT) -> float:
    """Cumulative record-level epsilon of everything in ``spends`` (0 when nothing was spent)."""
    return epsilon(composed_event(spends), delta, accountant)


# ---- user level (DP-FedAvg) and the calculator ------------------------------------------------
SAMPLING_SCHEMES = ("poisson", "fixed", "none")


def dpfedavg_round_event(
    noise_multiplier: float, population: int, clients_per_round: int, sampling: str,
    count_multiplier: float | None = None,
) -> dp_accounting.DpEvent:
    """One DP-FedAvg round: the Gaussian sum of clipped client updates, with client sampling.

    ``count_multiplier`` (adaptive clipping): the round also releases the noisy count of
    unclipped updates, a second Gaussian mechanism on the same sample with that noise multiplier;
    the sampled mechanism is then the composition of the two, as TF Privacy's
    ``QuantileAdaptiveClipSumQuery`` reports it (``ComposedDpEvent([sum, quantile])``).

    - ``poisson``: each client joins independently with q = clients_per_round / population
      (add/remove-one-client adjacency).
    - ``fixed``: exactly clients_per_round clients drawn without replacement (replace-one-client
      adjacency, the relation under which that sampling is analysed). Replacing one client can
      move a sum of updates clipped to C by 2C, and dp-accounting's noise multiplier is relative
      to that sensitivity, so the event carries ``noise_multiplier / 2``.
    - ``none``: no amplification; every round counts in full.
    """
    def mechanism(scale: float) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier * scale)
        if count_multiplier is None:
            return gaussian
        return dp_accounting.ComposedDpEvent([gaussian, dp_accounting.GaussianDpEvent(count_multiplier * scale)])

    gaussian = mechanism(1.0)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(clients_per_round / population, gaussian)
    if sampling == "fixed":
        replace_one = mechanism(0.5)
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


# ---- distributed discrete Gaussian (user_dp.noise_mode = distributed) ------------------------
# Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
# with Secure Aggregation" (ICML 2021), Proposition 14: adding the sum of n independent discrete
# Gaussians N_Z(0, sigma^2), sigma >= 1/2, to integer vectors x, x' in Z^d with ||x - x'||_2 <= D2
# and ||x - x'||_1 <= D1 gives, for every order alpha >= 1, with s2 = D2 / (sqrt(n) sigma),
# s1 = D1 / (sqrt(n) sigma) and tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)),
#   D_alpha <= min( alpha s2^2 / 2 + tau d,
#                   alpha (s2^2 + 2 s1 tau + tau^2 d) / 2,
#                   alpha (s2 + tau sqrt(d))^2 / 2 ).
# Each term is at most alpha * rho for alpha >= 1 with the rho of ddg_rho_from_scales, so the
# mechanism is rho-zCDP (docs/privacy.md, "Distributed noise", spells out the step).
DDG_MIN_LOCAL_STD = 0.5  # Proposition 14 needs sigma >= 1/2


def ddg_tau(local_std: float, contributors: int) -> float:
    """Kairouz et al.'s tau: how far a sum of ``contributors`` discrete Gaussians of standard
    deviation ``local_std`` is from one discrete Gaussian (in their Renyi-divergence sense)."""
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi**2 * local_std**2 * k / (k + 1)) for k in range(1, contributors))


def ddg_rho_from_scales(l2_scale: float, l1_scale: float, tau: float, dimension: int) -> float:
    """rho of the distributed discrete Gaussian from its sensitivity-to-noise ratios (see above);
    non-decreasing in each argument, so worst-case arguments give an upper bound."""
    return min(
        l2_scale**2 / 2 + tau * dimension,
        (l2_scale**2 + 2 * l1_scale * tau + tau**2 * dimension) / 2,
        (l2_scale + math.sqrt(dimension) * tau) ** 2 / 2,
    )


def ddg_rho(l2_sensitivity: float, l1_sensitivity: float, local_std: float, contributors: int,
            dimension: int) -> float:
    """rho-zCDP of one release of the sum of ``contributors`` integer vectors, each with its own
    N_Z(0, local_std^2) noise per coordinate; infinite outside Proposition 14's conditions."""
    if contributors < 1 or not local_std >= DDG_MIN_LOCAL_STD or not math.isfinite(local_std):
        return math.inf
    noise = math.sqrt(contributors) * local_std
    return ddg_rho_from_scales(l2_sensitivity / noise, l1_sensitivity / noise,
                               ddg_tau(local_std, contributors), dimension)


def distributed_dgauss_event(rho: float) -> dp_accounting.DpEvent:
    """The DpEvent of one rho-zCDP release: dp-accounting's ``ZCDpEvent(rho)``, whose RDP curve
    ``alpha * rho`` is that of ``GaussianDpEvent(1 / sqrt(2 rho))``. No sampling event wraps it:
    amplification by sampling is proven for the Gaussian, not for any rho-zCDP mechanism. The
    PLD accountant cannot analyse it (a zCDP bound does not give a privacy loss distribution),
    so PLD figures of such rounds are null."""
    if not rho < math.inf:
        return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.ZCDpEvent(rho)


def equivalent_noise_multiplier(event: dp_accounting.DpEvent) -> float:
    """The Gaussian noise multiplier with the same RDP curve as a ``distributed_dgauss_event``, or
    a composition of them (adaptive clipping's sum and count: the rhos add): ``1 / sqrt(2 rho)``;
    0 when a non-private event is among them."""
    parts = event.events if isinstance(event, dp_accounting.ComposedDpEvent) else [event]
    if not all(isinstance(e, dp_accounting.ZCDpEvent) for e in parts):
        return 0.0
    rho = math.fsum(e.rho for e in parts)
    return 1 / math.sqrt(2 * rho) if rho > 0 else math.inf


def discrete_gaussian_tail(threshold: float, local_std: float) -> float:
    """An upper bound on P(|X| > threshold) for X ~ N_Z(0, local_std^2): the discrete Gaussian
    is local_std-subgaussian (Canonne, Kamath and Steinke 2020), so each tail is at most
    exp(-threshold^2 / (2 local_std^2))."""
    if local_std <= 0:
        return 0.0 if threshold >= 0 else 1.0
    if threshold <= 0:
        return 1.0
    return min(1.0, 2.0 * math.exp(-threshold**2 / (2.0 * local_std**2)))


def charged_delta(delta: float, additions: Iterable[float]) -> float:
    """The delta left to the accountant once failure probabilities (``additions``, e.g. the
    chance of a SecAgg+ range overflow in each distributed round) are charged to ``delta``:
    an (epsilon, delta - sum)-DP mechanism that misbehaves with probability at most sum is
    (epsilon, delta)-DP. Zero or less means no epsilon holds at ``delta``."""
    return delta - math.fsum(additions)

