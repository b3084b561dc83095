"""The node budget guard: a node's own, persistent record-level spending and its budget.

Each node keeps a signed ledger (see :mod:`common.ledger`) in its state directory, signed by its
own key. Its spending is replayed from that ledger whenever the guard is opened, so a restart, a
new process or a new run starts from everything already spent: privacy loss never resets.
Before a round, the guard checks that the round's planned spend keeps the node within budget;
only then does the node train.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, Iterator

from fedpriv.common import rundir
from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT, DPSGDSpend, record_level_epsilon
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import open_private
from fedpriv.common.ledger import LedgerWriter, load_or_create_signing_key
from fedpriv.common.ledger_schema import NODE, Kind
from fedpriv.common.replay import replay
from fedpriv.common.witness import NODE_CLIENT_ID, NODE_RUN_HEAD

NODE_KEY = rundir.NODE_KEY
LOCK = rundir.NODE_LOCK
RUN_ID = "run_id"  # the fedpriv run a spend was made in (entry parameters)


class BudgetExhausted(FedprivError):
    """Training this round would take the node past its record-level budget."""


@contextlib.contextmanager
def open_guard(state_dir: Path, budget: float, delta: float) -> Iterator[NodeBudgetGuard]:
    """The node's guard, read fresh from disk and held under an exclusive lock for one round.

    Never cached in memory: in simulation a virtual node can run in a different worker process
    each round, and a stale copy would both undercount spending and fork the node's ledger.
    """
    with open_private(state_dir / LOCK, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield NodeBudgetGuard(state_dir, budget, delta)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class NodeBudgetGuard:
    """Persistent record-level spending of one node, enforced against ``budget`` (0: none).

    Open it with :func:`open_guard`, which holds the node's lock.
    """

    def __init__(self, state_dir: Path, budget: float, delta: float) -> None:
        self.state_dir = state_dir
        self.budget = budget
        self.delta = delta
        key = load_or_create_signing_key(state_dir / NODE_KEY)
        self.ledger = LedgerWriter(state_dir, key)  # verifies what is already there
        state = replay(self.ledger.existing)  # the one replay of a ledger (common.replay)
        if state.unreadable:
            raise FedprivError(f"node ledger {self.ledger.path}: entry {state.unreadable[0].seq}'s DpEvent "
                               f"cannot be read ({state.unreadable[0].note})")
        recorded = [spend for spends in state.actors.values() for spend in spends.of_kind(Kind.RECORD_LEVEL)]
        recorded.sort(key=lambda spend: spend.seq)
        self.spends = [DPSGDSpend.from_json(spend.parameters) for spend in recorded]
        self.run_ids: list[str | None] = [spend.parameters.get(RUN_ID) for spend in recorded]

    def spends_before(self, run_id: str) -> list[DPSGDSpend]:
        """Spending outside the fedpriv run ``run_id``: every spend not tagged with it (untagged
        spends from older versions count as outside). Budget checks always use all spends."""
        return [s for s, tag in zip(self.spends, self.run_ids, strict=True) if tag != run_id]

    def epsilon(self, extra: DPSGDSpend | None = None) -> float:
        return record_level_epsilon(self.spends + ([extra] if extra else []), self.delta)

    def check(self, planned: DPSGDSpend) -> None:
        """Raise :class:`BudgetExhausted` if ``planned`` would exceed the budget."""
        if not self.budget:
            return
        before, after = self.epsilon(), self.epsilon(planned)
        if after > self.budget:
            raise BudgetExhausted(
                f"budget exhausted: this round would raise record-level epsilon from {before:.3f} "
                f"to {after:.3f}, above the node's budget of {self.budget:g}"
            )

    def check_run(self, planned: DPSGDSpend, run_id: str | None, budget: float) -> None:
        """Raise :class:`BudgetExhausted` if ``planned`` would take the spending within the fedpriv
        run ``run_id`` past ``budget`` (0: no per-run budget). Without a run id every spend
        counts as this run's, which can only refuse more."""
        if not budget:
            return
        mine = [s for s, tag in zip(self.spends, self.run_ids, strict=True) if run_id is None or tag == run_id]
        before = record_level_epsilon(mine, self.delta) if mine else 0.0
        after = record_level_epsilon(mine + [planned], self.delta)
        if after > budget:
            raise BudgetExhausted(
                f"budget exhausted: this round would raise this run's record-level epsilon from "
                f"{before:.3f} to {after:.3f}, above the node's per-run budget of {budget:g}"
            )

    def record(self, spend: DPSGDSpend, server_round: int | None, run_id: str | None = None,
               run_head: dict[str, Any] | None = None, client_id: int | str | None = None) -> float:
        """Persist a spend (fsynced before the update leaves the node), tagged with the fedpriv
        run it was made in, the client id the run records it under, and the head of the run's
        ledger the server sent (a witness of that ledger, :mod:`common.witness`); return the new
        epsilon."""
        self.spends.append(spend)
        self.run_ids.append(run_id)
        epsilon = self.epsilon()
        parameters = {**spend.to_json(), **({RUN_ID: run_id} if run_id else {})}
        if run_head is not None:
            parameters[NODE_RUN_HEAD] = run_head
        if client_id is not None:
            parameters[NODE_CLIENT_ID] = str(client_id)
        self.ledger.append(
            actor=NODE, kind=Kind.RECORD_LEVEL, round=server_round, event=spend.to_event(),
            parameters=parameters, sampling="poisson", epsilon={ENFORCEMENT_ACCOUNTANT: epsilon},
        )
        return epsilon
