"""Server-side privacy bookkeeping: the run's signed ledger, user-level accounting and budget.

Every privacy-relevant thing the server learns or does goes into the run's ledger as it happens:
each client's record-level spend (and what it had spent before this run), each round of
user-level DP, each refusal, and the stop before a round that would exceed the user-level budget.
Cumulative epsilon is always recomputed from the recorded events, never kept as a running sum.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import dp_accounting

from common import accounting
from common.accounting import DPSGDSpend
from common.config import RunConfig
from common.errors import FedprivError
from common.ledger import LedgerWriter, load_or_create_signing_key

ENFORCEMENT_ACCOUNTANT = "rdp"
USER_LEVEL_SAMPLING = "fixed"  # Flower samples a fixed number of nodes without replacement
KEY_ENV = "FEDPRIV_LEDGER_KEY"


def _checked(spend: DPSGDSpend) -> DPSGDSpend:
    if not (0 < spend.sampling_probability <= 1 and math.isfinite(spend.noise_multiplier)
            and spend.noise_multiplier >= 0 and spend.steps >= 0):
        raise ValueError(f"implausible spend {spend}")
    return spend


class UserBudgetExhausted(FedprivError):
    """The next round would take user-level epsilon past the run's budget."""


def signing_key_path() -> Path:
    """The server's ledger-signing key: ``$FEDPRIV_LEDGER_KEY``, else under ``$FEDPRIV_HOME``."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    home = Path(os.environ.get("FEDPRIV_HOME", Path.home() / ".fedpriv"))
    return home / "keys" / "ledger-signing.key"


class PrivacyRecorder:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.delta = cfg.privacy.delta
        self.ledger = LedgerWriter(run_dir, load_or_create_signing_key(signing_key_path()))
        self.client_events: dict[str, list[dp_accounting.DpEvent]] = {}
        self.user_events: list[dp_accounting.DpEvent] = []
        self.refusals: list[dict[str, Any]] = []
        self.stopped: dict[str, Any] | None = None
        self.ledger.append(
            actor="server", kind="run_start",
            parameters={
                "config": cfg.to_flat(),
                "delta": self.delta,
                "record_budget": cfg.privacy.record_budget or None,
                "user_budget": cfg.privacy.user_budget or None,
                "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
            },
        )

    # ---- record level -------------------------------------------------------------------
    @staticmethod
    def parse_declaration(privacy: dict[str, Any]) -> dict[str, Any]:
        """Read a client's privacy record; raise ValueError/KeyError/TypeError if malformed."""
        declared: dict[str, Any] = {"prior": [], "round": None}
        if "prior-spends" in privacy:
            declared["prior"] = [_checked(DPSGDSpend.from_json(s)) for s in json.loads(privacy["prior-spends"])]
        if "round-spend" in privacy:
            declared["round"] = _checked(DPSGDSpend.from_json(json.loads(privacy["round-spend"])))
        return declared

    def record_client(self, server_round: int, client_id: str, declared: dict[str, Any]) -> float | None:
        """Record a client's declared spending for this round; return its cumulative epsilon."""
        actor = f"client:{client_id}"
        events = self.client_events.setdefault(client_id, [])
        prior = declared["prior"]
        if prior:
            carried = accounting.composed_event(prior)
            events.append(carried)
            self.ledger.append(
                actor=actor, kind="record_level_carried", round=server_round, event=carried,
                parameters={"spends": [s.to_json() for s in prior]}, sampling="poisson",
                epsilon={"rdp": self._epsilon(events)},
                note="spending before this run, from the node's own ledger",
            )
        spend = declared["round"]
        if spend is None:
            return None
        events.append(spend.to_event())
        epsilon = self._epsilon(events)
        self.ledger.append(
            actor=actor, kind="record_level", round=server_round, event=spend.to_event(),
            parameters={**spend.to_json(), "l2_norm_clip": self.cfg.dp.l2_norm_clip},
            sampling="poisson", epsilon={"rdp": epsilon},
        )
        return epsilon

    def record_refusal(self, server_round: int, node: str, reason: str) -> None:
        self.refusals.append({"round": server_round, "node": node, "reason": reason})
        self.ledger.append(actor=f"node:{node}", kind="refusal", round=server_round, note=reason)

    # ---- user level ---------------------------------------------------------------------
    def user_round_event(self, population: int, sampled: int) -> dp_accounting.DpEvent:
        return accounting.dpfedavg_round_event(
            self.cfg.user_dp.noise_multiplier, population, sampled, USER_LEVEL_SAMPLING)

    def check_user_budget(self, server_round: int, population: int, sampled: int) -> None:
        """Before a round: stop (and record why) if it could exceed the user-level budget."""
        budget = self.cfg.privacy.user_budget
        if not (self.cfg.user_dp.enabled and budget):
            return
        before = self._user_epsilon(self.user_events)
        after = self._user_epsilon(self.user_events + [self.user_round_event(population, sampled)])
        if after > budget:
            reason = (f"round {server_round} would raise user-level epsilon from {before:.3f} to "
                      f"{after:.3f}, above the budget of {budget:g}; ending the run")
            self.stopped = {"round": server_round, "reason": reason}
            self.ledger.append(actor="server", kind="budget_stop", round=server_round,
                               epsilon={"rdp": before}, note=reason)
            raise UserBudgetExhausted(reason)

    def record_user_round(self, server_round: int, population: int, sampled: int, aggregated: int) -> float:
        event = self.user_round_event(population, sampled)
        self.user_events.append(event)
        epsilon = self._user_epsilon(self.user_events)
        self.ledger.append(
            actor="server", kind="user_level", round=server_round, event=event,
            parameters={
                "population": population, "clients_sampled": sampled, "clients_aggregated": aggregated,
                "noise_multiplier": self.cfg.user_dp.noise_multiplier,
                "clipping_norm": self.cfg.user_dp.clipping_norm,
                "noise_std_on_sum": self.cfg.user_dp.noise_multiplier * self.cfg.user_dp.clipping_norm,
            },
            sampling=USER_LEVEL_SAMPLING, epsilon={"rdp": epsilon},
        )
        return epsilon

    # ---- end ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Write the run_end entry; return the privacy figures (RDP and PLD) for the summary."""
        record = {
            cid: {name: accounting.epsilon_or_none(dp_accounting.ComposedDpEvent(events), self.delta, name)
                  for name in accounting.ACCOUNTANTS}
            for cid, events in sorted(self.client_events.items(), key=lambda kv: int(kv[0]))
            if events
        }
        user = None
        if self.cfg.user_dp.enabled:
            event = dp_accounting.ComposedDpEvent(self.user_events)
            user = {name: accounting.epsilon_or_none(event, self.delta, name, USER_LEVEL_SAMPLING)
                    for name in accounting.ACCOUNTANTS}
        self.ledger.append(actor="server", kind="run_end",
                           epsilon={"record_level": record, "user_level": user},
                           note=self.stopped["reason"] if self.stopped else None)
        return {"record_level": record, "user_level": user}

    # ---- helpers ------------------------------------------------------------------------
    def _epsilon(self, events: list[dp_accounting.DpEvent]) -> float:
        return accounting.epsilon(dp_accounting.ComposedDpEvent(events), self.delta, ENFORCEMENT_ACCOUNTANT)

    def _user_epsilon(self, events: list[dp_accounting.DpEvent]) -> float:
        if not events:
            return 0.0
        if self.cfg.user_dp.noise_multiplier == 0:
            return float("inf")
        value = accounting.epsilon_or_none(dp_accounting.ComposedDpEvent(events), self.delta,
                                           ENFORCEMENT_ACCOUNTANT, USER_LEVEL_SAMPLING)
        return math.inf if value is None else value
