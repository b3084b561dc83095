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
from typing import Any, Sequence

import numpy as np

DEFAULT_CONFIDENCE = 0.95
# Shares of the m canaries guessed: each both two-sided (half "in", half "out") and one-sided
# (all "in"). Fixed in advance; the grid is paid for with a Bonferroni correction.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
LOW_FPRS = (0.001, 0.01)
_BISECTION_STEPS = 60
_EPSILON_CAP = 100.0  # beyond any bound m <= 10^6 canaries can show

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
                  confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """The one-run lower bound from canary ``scores`` (higher: more likely included) and the
    canaries' true inclusion. Ties in score are broken by canary index, never by inclusion."""
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
                         "guesses": r, "correct": correct, "guesses_in": guesses_in,
                         "guesses_out": guesses_out})
    # The best bound; when none is above 0, the plan that guesses the most (for the report).
    best = max(results, key=lambda x: (x["epsilon_lower_bound"], x["guesses"]))
    return {
        **best,
        "canaries": m,
        "included": int(included.sum()),
        "delta": delta,
        "confidence": confidence,
        "plans_tried": len(plans),
        "confidence_per_plan": per_plan,
    }


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
