"""fedpriv's record-level figures against dp-accounting and TF Privacy called directly."""

import math
import re

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedpriv.common.accounting import (
    DPSGDSpend, effective_noise_multiplier, merge_spends, record_level_epsilon,
)


def _direct_rdp(q, z, steps, delta):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


def test_matches_dp_accounting_rdp_for_mnist_scale_dpsgd():
    # N=60,000, B=256, z=1.1, 60 epochs, delta=1e-5 (the figure TF Privacy's tutorial quotes)
    q, steps = 256 / 60000, 60 * math.ceil(60000 / 256)
    ours = record_level_epsilon([DPSGDSpend(q, 1.1, steps)], 1e-5)
    assert ours == pytest.approx(_direct_rdp(q, 1.1, steps, 1e-5), rel=1e-6)
    assert ours == pytest.approx(2.60, abs=0.02)


def test_matches_dp_accounting_pld():
    q, steps = 256 / 60000, 60 * math.ceil(60000 / 256)
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps)
    ours = record_level_epsilon([DPSGDSpend(q, 1.1, steps)], 1e-5, accountant="pld")
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert ours == pytest.approx(2.38, abs=0.03)


def test_rounds_compose_like_one_long_run():
    per_round = [DPSGDSpend(0.08, 1.1, 26) for _ in range(5)]
    assert merge_spends(per_round) == [DPSGDSpend(0.08, 1.1, 130)]
    assert record_level_epsilon(per_round, 1e-5) == pytest.approx(_direct_rdp(0.08, 1.1, 130, 1e-5), rel=1e-6)


def test_mixed_rates_compose():
    spends = [DPSGDSpend(0.05, 1.0, 30), DPSGDSpend(0.1, 1.5, 20)]
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 30)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 20)
    assert record_level_epsilon(spends, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_epsilon_grows_with_every_round():
    values = [record_level_epsilon([DPSGDSpend(0.08, 1.1, 13)] * r, 1e-5) for r in range(1, 6)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_nothing_spent_and_no_noise():
    assert record_level_epsilon([], 1e-5) == 0.0
    assert record_level_epsilon([DPSGDSpend(0.1, 0.0, 1)], 1e-5) == math.inf


def test_microbatching_matches_tf_privacy_statement():
    from tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib import (
        compute_dp_sgd_privacy_statement,
    )

    n, batch, epochs, z, microbatches, delta = 60000, 256, 15, 1.1, 32, 1e-5
    statement = compute_dp_sgd_privacy_statement(
        number_of_examples=n, batch_size=batch, num_epochs=epochs, noise_multiplier=z,
        delta=delta, used_microbatching=True,
    )
    # TF Privacy: "Epsilon assuming Poisson sampling (*): <x>" (RDP), which is what fedpriv samples
    tf_privacy_eps = float(re.search(r"Poisson sampling \(\*\):\s+([0-9.]+)", statement).group(1))
    steps = int(math.ceil(epochs * n / batch))
    z_eff = effective_noise_multiplier(z, microbatches, batch)
    assert z_eff == pytest.approx(z / 2)
    ours = record_level_epsilon([DPSGDSpend(batch / n, z_eff, steps)], delta)
    assert ours == pytest.approx(tf_privacy_eps, rel=1e-3)  # statement prints 3 decimals


def test_one_example_per_microbatch_keeps_full_noise():
    assert effective_noise_multiplier(1.1, 0, 32) == 1.1
    assert effective_noise_multiplier(1.1, 32, 32) == 1.1
    assert effective_noise_multiplier(1.1, 8, 32) == pytest.approx(0.55)


# ---- one epsilon policy, failing closed -----------------------------------------------------------
def test_an_event_no_accountant_can_analyse_is_infinite_never_zero():
    from fedpriv.common.accounting import analysable, epsilon

    step = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0))
    # dp-accounting's RDP accountant cannot analyse sampling without replacement under add/remove
    # adjacency, nor an event it does not know: both are infinite epsilon for enforcement.
    without_replacement = dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.0))
    assert not rdp.RdpAccountant().supports(without_replacement)
    for unknown in (without_replacement, dp_accounting.UnsupportedDpEvent()):
        assert not analysable(unknown)
        assert epsilon([unknown], 1e-5) == math.inf
        assert epsilon([step, unknown], 1e-5) == math.inf  # composed with anything, still infinite
    assert epsilon([step, dp_accounting.NonPrivateDpEvent()], 1e-5) == math.inf  # analysable, and unbounded
    # What the accountant can analyse is dp-accounting's own figure; nothing spent is zero.
    assert epsilon([step] * 3, 1e-5) == pytest.approx(_direct_rdp(0.1, 1.0, 3, 1e-5), rel=1e-6)
    assert epsilon([], 1e-5) == 0.0


def test_replace_one_relation_for_fixed_size_sampling_matches_dp_accounting():
    from fedpriv.common.accounting import epsilon, epsilon_or_none

    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5))
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(event, 10)
    assert epsilon([event] * 10, 1e-5, "rdp", "fixed") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert epsilon_or_none([event], 1e-5, "pld", "fixed") is None  # a report's "n/a", not a number


def test_no_module_reads_dp_accounting_internals_or_builds_its_own_accountant():
    """One home: only common/accounting.py builds accountants, and only through public API."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("server", "clients", "common", "fedpriv", "simulations") for p in (root / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\._(rdp|orders)\b", text), f"{path.name} reads dp-accounting internals"
        if path.name != "accounting.py" or path.parent.name != "common":
            assert not re.search(r"(RdpAccountant|PLDAccountant)\s*\(", text), f"{path.name} builds an accountant"
