"""The node budget guard: persistent, enforced, and never reset by a restart."""

import pytest

from fedpriv.clients.budget import BudgetExhausted, open_guard
from fedpriv.common.accounting import DPSGDSpend, record_level_epsilon
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LEDGER

SPEND = DPSGDSpend(0.1, 1.1, 10)
DELTA = 1e-5


def test_spending_persists_across_openings(tmp_path):
    with open_guard(tmp_path, budget=0, delta=DELTA) as guard:
        assert guard.spends == []
        guard.record(SPEND, 1)
    with open_guard(tmp_path, budget=0, delta=DELTA) as guard:  # a restart: a fresh object
        assert guard.spends == [SPEND]
        guard.record(SPEND, 2)
    with open_guard(tmp_path, budget=0, delta=DELTA) as guard:
        assert guard.epsilon() == pytest.approx(record_level_epsilon([SPEND, SPEND], DELTA))


def test_check_refuses_a_round_that_would_exceed_the_budget(tmp_path):
    one, two = record_level_epsilon([SPEND], DELTA), record_level_epsilon([SPEND] * 2, DELTA)
    budget = (one + two) / 2
    with open_guard(tmp_path, budget, DELTA) as guard:
        guard.check(SPEND)
        guard.record(SPEND, 1)
        with pytest.raises(BudgetExhausted, match="budget exhausted"):
            guard.check(SPEND)
    with open_guard(tmp_path, budget, DELTA) as guard:  # still refused after a restart
        with pytest.raises(BudgetExhausted):
            guard.check(SPEND)


def test_tampered_node_ledger_is_refused(tmp_path):
    with open_guard(tmp_path, 0, DELTA) as guard:
        guard.record(SPEND, 1)
    path = tmp_path / LEDGER
    path.write_bytes(path.read_bytes().replace(b'"steps":10', b'"steps":1'))
    with pytest.raises(FedprivError, match="refusing to extend ledger"):
        with open_guard(tmp_path, 0, DELTA):
            pass
