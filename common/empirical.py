"""Empirical privacy: a measured lower bound on epsilon, and membership inference, from scores.

**One-run lower bound** (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS; arXiv:2305.08846, Section 5 and the Python in its appendix). ``m``
canaries are each included in the training data independently with probability 1/2. After one
training run an auditor scores every canary and makes ``r`` guesses ("in" or "out", abstaining on
the rest), ``v`` of them correct. If training is (epsilon, delta)-DP with respect to each canary,
the number of correct guesses is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))``
up to a delta term:

    P[correct >= v] <= P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i,
    B ~ Binomial(r, e^eps / (1 + e^eps)).

:func:`p_value` is that right-hand side; :func:`epsilon_lower_bound` is the largest epsilon whose
p-value is still below ``1 - confidence``: with that confidence the training run is *not*
(epsilon, delta)-DP for any smaller epsilon. The bound is one-sided and usually far below the
accounted epsilon even for a correct implementation; a lower bound *above* the accounted epsilon
shows, at that confidence, that the implementation does not deliver its accounting.

**The f-DP bound** (Mahloujifar, Melis and Chaudhuri 2024, "Auditing f-Differential Privacy in
One Run", arXiv:2410.22235, ICML 2025). The bound above asks whether the guesses could come from
an eps-DP randomized response; a Gaussian mechanism (DP-SGD) is far from that shape, so the bound
stays well below the accounted epsilon even when an attack sees everything. The f-DP analysis
instead asks whether ``v`` correct out of ``r`` guesses are possible for *any* mechanism whose
trade-off function is ``f`` (type II error ``f(alpha)`` at type I error ``alpha``): it bounds, at
significance ``a``, the expected shares of correct and incorrect guesses by a recursion over the
correct guesses (:func:`fdp_rejects`). Two uses:

- :func:`gdp_epsilon_lower_bound`: the largest epsilon for which the Gaussian mechanism that is
  exactly (epsilon, delta)-DP (its noise from ``dp_accounting.get_sigma_gaussian``) is rejected.
  It assumes the mechanism's trade-off curve has the Gaussian shape, which composed DP-SGD steps
  approach (central limit theorem); it is the estimate set beside the accounted epsilon.
- :func:`profile_tradeoff`: the trade-off function of a privacy profile ``delta(epsilon)`` (the
  accountant's, from dp-accounting's PLD), the tightest one the profile implies on a grid of
  epsilons. Rejecting it rejects the accountant's claim itself, with no assumption on shape: that
  is the rigorous violation test (:func:`one_run_audit` with ``claim``).

**Choosing the number of guesses.** :func:`one_run_audit` guesses "in" for the highest-scoring
canaries and "out" for the lowest. The counts are not tuned on the outcome for free: a fixed grid
of :data:`GUESS_FRACTIONS` (each two-sided and one-sided) is evaluated at significance
``(1 - confidence) / len(grid)`` and the best bound is kept (a Bonferroni correction over the
grid), so the reported bound holds at the stated confidence for the choice as made.

**Membership inference** on ordinary examples: a loss-threshold attack (Yeom et al. 2018), members
being the training data and non-members the held-out test data, summarised by ROC AUC and the
true-positive rate at low false-positive rates (Carlini et al. 2022), from scikit-learn. TF
Privacy 0.9 ships ``privacy.privacy_tests.membership_inference_attack`` only as a redirect to a
package this install does not have (and its split-out successor, tensorflow-empirical-privacy,
fails to import with scikit-learn 1.9), so the attack is these few lines instead.

Binomial tails are computed here with ``math.lgamma`` and numpy (scipy is only a development
dependency); the tests compare them with scipy and with brute-force enumeration.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_CONFIDENCE = 0.95
# Shares of the m canaries guessed: each both two-sided (half "in", half "out") and one-sided
# (all "in"). Fixed in advance; the grid is paid for with a Bonferroni correction.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
LOW_FPRS = (0.001, 0.01)
_BISECTION_STEPS = 60
_EPSILON_CAP = 100.0  # beyond any bound m <= 10^6 canaries can show
_GDP_EPSILON_FLOOR = 1e-3  # the f-DP bound's smallest epsilon (below it: reported as 0)
_GDP_BISECTION_STEPS = 30

# The verdicts of an empirical audit (simulations/empirical_audit.py), as audit-empirical.json holds them.
VERDICT_CONSISTENT = "consistent"
VERDICT_VIOLATION = "VIOLATION: measured leakage exceeds the accounted bound"


@functools.lru_cache(maxsize=64)
def _log_binomial_coefficients(r: int) -> np.ndarray:
    """log C(r, k) for k = 0..r."""
    lg = np.array([math.lgamma(k + 1) for k in range(r + 1)])
    return lg[r] - lg - lg[::-1]


def binomial_pmf(r: int, q: float) -> np.ndarray:
    """P[Binomial(r, q) = k] for k = 0..r, in log space so large r does not underflow."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    k = np.arange(r + 1)
    if q in (0.0, 1.0):
        return (k == (r if q == 1.0 else 0)).astype(float)
    log_pmf = _log_binomial_coefficients(r) + k * math.log(q) + (r - k) * math.log1p(-q)
    return np.exp(log_pmf)


def _accuracy(epsilon: float) -> float:
    """e^eps / (1 + e^eps): the accuracy of eps-DP randomized response."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer))
            and isinstance(v, (int, np.integer))):
        raise TypeError("m, r and v must be integers")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability that an (epsilon, delta)-DP training run lets ``r`` guesses about
    ``m`` canaries be right ``v`` times or more (the module docstring's bound)."""
    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    pmf = binomial_pmf(r, _accuracy(epsilon))
    tail = float(pmf[v:].sum())
    if delta == 0:
        return min(tail, 1.0)
    below = np.cumsum(pmf[:v][::-1])  # below[i - 1] = P[v - i <= B < v]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + alpha * 2 * m * delta, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest epsilon that ``v`` correct out of ``r`` guesses rule out at ``confidence``:
    sup {eps : p_value(eps) < 1 - confidence}, by bisection (0 when nothing is ruled out)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0  # p_value(low) < significance <= p_value(high), p increasing in eps
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
        if high > _EPSILON_CAP:
            return math.inf
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def guess_plans(m: int) -> list[tuple[int, int]]:
    """The fixed grid of (guesses "in", guesses "out") for ``m`` canaries, without repeats."""
    plans: list[tuple[int, int]] = []
    for fraction in GUESS_FRACTIONS:
        r = max(1, round(fraction * m))
        for plan in ((r - r // 2, r // 2), (r, 0)):
            if plan not in plans and sum(plan) <= m:
                plans.append(plan)
    return plans


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float,
                  confidence: float = DEFAULT_CONFIDENCE,
                  claim: Callable[[float], float] | None = None) -> dict[str, Any]:
    """The one-run lower bounds from canary ``scores`` (higher: more likely included) and the
    canaries' true inclusion: Steinke et al.'s (``epsilon_lower_bound``) and the Gaussian f-DP one
    (``gdp_epsilon_lower_bound``), each the best over the fixed grid of guess counts at the
    Bonferroni-corrected confidence. With ``claim`` (a trade-off function as ``f(1 - x)``, e.g.
    :func:`profile_tradeoff` of the accountant's profile), ``claim_rejected`` says whether some
    plan's guesses are impossible for it at that confidence. Ties in score are broken by canary
    index, never by inclusion."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or len(included) != m:
        raise ValueError("need one inclusion flag per canary, and at least one canary")
    if np.isnan(scores).any():
        raise ValueError("canary scores must not be NaN")
    order = np.lexsort((np.arange(m), -scores))  # highest score first
    ranked = included[order]
    plans = guess_plans(m)
    per_plan = confidence_for(confidence, len(plans))
    results = []
    for guesses_in, guesses_out in plans:
        correct = int(ranked[:guesses_in].sum()) + int((~ranked[m - guesses_out:]).sum())
        r = guesses_in + guesses_out
        results.append({"epsilon_lower_bound": epsilon_lower_bound(m, r, correct, delta, per_plan),
                        "gdp_epsilon_lower_bound": gdp_epsilon_lower_bound(m, r, correct, delta, per_plan),
                        "claim_rejected": (None if claim is None
                                           else fdp_rejects(claim, m, r, correct, 1 - per_plan)),
                        "guesses": r, "correct": correct, "guesses_in": guesses_in,
                        "guesses_out": guesses_out})
    # The best bound; when none is above 0, the plan that guesses the most (for the report).
    best = max(results, key=lambda x: (x["epsilon_lower_bound"], x["guesses"]))
    best_gdp = max(results, key=lambda x: (x["gdp_epsilon_lower_bound"], x["guesses"]))
    return {
        **{key: value for key, value in best.items() if key not in ("gdp_epsilon_lower_bound", "claim_rejected")},
        "gdp_epsilon_lower_bound": best_gdp["gdp_epsilon_lower_bound"],
        "gdp_guesses": best_gdp["guesses"],
        "gdp_correct": best_gdp["correct"],
        "claim_rejected": None if claim is None else any(x["claim_rejected"] for x in results),
        "canaries": m,
        "included": int(included.sum()),
        "delta": delta,
        "confidence": confidence,
        "plans_tried": len(plans),
        "confidence_per_plan": per_plan,
    }


# ---- f-DP (Mahloujifar, Melis and Chaudhuri 2024) -------------------------------------------
def fdp_rejects(blow_up: Callable[[float], float], m: int, r: int, v: int, significance: float) -> bool:
    """Whether ``v`` correct out of ``r`` guesses about ``m`` canaries reject, at ``significance``,
    every mechanism with trade-off function ``f``. ``blow_up(x)`` is ``f(1 - x)`` (for a symmetric
    ``f``): the least probability, under one hypothesis, of an event that has probability ``x``
    under the other.

    The paper's recursion for guesses with abstention (its "audit_rh_with_cap"): ``c`` and ``w``
    start as the shares ``significance * v / m`` and ``significance * (r - v) / m`` of correct and
    wrong guesses; going down the correct guesses, ``w`` is raised to at least ``blow_up(c)`` and ``c``
    by the share of the rise that the remaining guesses can carry, capped at 1. The observation is
    impossible for ``f`` (rejected) when ``c + w`` ends above ``r / m``."""
    _check_counts(m, r, v)
    if v == 0 or r == 0:
        return False
    correct, wrong = significance * v / m, significance * (r - v) / m
    for i in range(v - 1, -1, -1):
        raised = max(wrong, blow_up(correct))
        if raised == wrong:  # nothing moves any more
            break
        correct = min(correct + i / (r - i) * (raised - wrong), 1.0)
        wrong = raised
    return correct + wrong > r / m


def gaussian_blow_up(epsilon: float, delta: float) -> Callable[[float], float]:
    """``f(1 - x)`` for the Gaussian mechanism that is exactly (``epsilon``, ``delta``)-DP: with
    ``mu = 1 / sigma``, ``f(a) = Phi(Phi^-1(1 - a) - mu)``, so ``f(1 - x) = Phi(Phi^-1(x) - mu)``."""
    import dp_accounting

    mu = 1.0 / dp_accounting.get_sigma_gaussian(epsilon, delta)
    normal = NormalDist()

    def blow_up(x: float) -> float:
        if x <= 0.0:
            return 0.0
        if x >= 1.0:
            return 1.0
        return normal.cdf(normal.inv_cdf(x) - mu)

    return blow_up


def gdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                            confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest epsilon whose exactly (epsilon, ``delta``)-DP Gaussian mechanism ``v`` correct
    out of ``r`` guesses reject at ``confidence`` (0 when none is rejected; bisection)."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return fdp_rejects(gaussian_blow_up(epsilon, delta), m, r, v, significance)

    low = _GDP_EPSILON_FLOOR
    if not rejected(low):
        return 0.0
    high = 1.0
    while rejected(high):
        low, high = high, 2 * high
        if high > _EPSILON_CAP:
            return math.inf
    for _ in range(_GDP_BISECTION_STEPS):
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def profile_tradeoff(epsilons: Sequence[float], deltas: Sequence[float]) -> Callable[[float], float]:
    """``f(1 - x)`` for the trade-off function a privacy profile implies: a mechanism that is
    (eps_j, delta_j)-DP for every j has ``f(a) >= max(0, 1 - delta_j - e^eps_j a,
    e^-eps_j (1 - delta_j - a))`` for every j. On a finite grid this ``f`` is lower than the
    profile's own, so rejecting it is never easier than rejecting the profile: the test stays valid."""
    eps = np.asarray(epsilons, dtype=float)
    deltas_ = np.asarray(deltas, dtype=float)
    if eps.shape != deltas_.shape or eps.ndim != 1 or len(eps) == 0:
        raise ValueError("need one delta per epsilon, and at least one")
    grow, shrink = np.exp(eps), np.exp(-eps)

    def blow_up(x: float) -> float:
        # f(1 - x): 1 - delta - e^eps (1 - x)  and  e^-eps (x - delta)
        return float(max(0.0, np.max(grow * x - (grow - 1.0) - deltas_), np.max(shrink * (x - deltas_))))

    return blow_up


def gaussian_estimate(scores_in: Sequence[float], scores_out: Sequence[float], delta: float) -> dict[str, float]:
    """An *estimate*, not a bound (Andrew et al., ICLR 2024, "One-shot Empirical Privacy
    Estimation for Federated Learning"): the in and out scores taken as two Gaussians of one
    variance, ``mu`` their distance in units of the pooled standard deviation, and epsilon that of
    the mu-GDP Gaussian mechanism at ``delta`` (dp-accounting's ``get_epsilon_gaussian``; 0 when
    ``mu <= 0``)."""
    import dp_accounting

    inside, outside = np.asarray(scores_in, float), np.asarray(scores_out, float)
    if len(inside) < 2 or len(outside) < 2:
        raise ValueError("the estimate needs at least two scores in and two out")
    pooled = math.sqrt((inside.var(ddof=1) * (len(inside) - 1) + outside.var(ddof=1) * (len(outside) - 1))
                       / (len(inside) + len(outside) - 2))
    mu = (inside.mean() - outside.mean()) / pooled if pooled > 0 else math.inf
    if not mu > 0:
        return {"mu": float(mu), "epsilon": 0.0}
    if not math.isfinite(mu) or mu > 50:
        return {"mu": float(mu), "epsilon": math.inf}
    return {"mu": float(mu), "epsilon": float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))}


def confidence_for(confidence: float, tries: int) -> float:
    """Bonferroni: the confidence each of ``tries`` bounds needs for all to hold together."""
    return 1 - (1 - confidence) / tries


def membership_inference(member_losses: Sequence[float], nonmember_losses: Sequence[float],
                         fprs: Sequence[float] = LOW_FPRS) -> dict[str, Any]:
    """Loss-threshold attack: ROC AUC and TPR at each of ``fprs`` (members have lower loss)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members = np.asarray(member_losses, dtype=float)
    nonmembers = np.asarray(nonmember_losses, dtype=float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("the attack needs members and non-members")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    scores = -np.concatenate([members, nonmembers])
    scores = np.nan_to_num(scores, nan=-np.inf, neginf=-1e300, posinf=1e300)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        # the best TPR at a threshold whose FPR is at most the target
        "tpr_at_fpr": {f"{target:g}": float(tpr[fpr <= target].max()) for target in fprs},
        "members": int(len(members)),
        "nonmembers": int(len(nonmembers)),
    }
