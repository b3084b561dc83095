"""Server-side privacy bookkeeping: the run's signed ledger, user-level accounting and budget.

Every privacy-relevant thing the server learns or does goes into the run's ledger as it happens:
each client's record-level spend (and what it had spent before this run), each round of
user-level DP, each refusal, and the stop before a round that would exceed the user-level budget.
Cumulative epsilon is always recomputed from the recorded events, never kept as a running sum.
User-level spending is composed with that of the earlier runs of the same server state (one
population; :mod:`common.population`), and the user-level budget is enforced on the composition.
A resumed run (:mod:`server.resume`) rebuilds its state from the verified ledger, every entry
counted, and continues the same ledger after a ``run_resume`` entry.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from fedpriv.common import accounting, rundir, user_dp
from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT, DPSGDSpend
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common import witness
from fedpriv.common.lazy import lazy_import
from fedpriv.common.ledger import LedgerWriter, key_id, load_or_create_signing_key
from fedpriv.common.population import Composition, compose_state
from fedpriv.common.ledger_schema import SERVER, Kind, client_actor, node_actor
from fedpriv.common.replay import LedgerState, node_of, replay
from fedpriv.common.user_dp import USER_LEVEL_SAMPLING
from fedpriv.server import resume as resume_checks
from fedpriv.server.resume import RestorePoint

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

KEY_ENV = rundir.LEDGER_KEY_ENV
CUMULATIVE = "rdp_with_earlier_runs"  # a user_level entry's epsilon composed with the earlier runs'
# What the user-level accounting of a round assumes, by noise mode (written into each entry).
ASSUMPTIONS = user_dp.ASSUMPTIONS


def _checked(spend: DPSGDSpend) -> DPSGDSpend:
    if not (0 < spend.sampling_probability <= 1 and math.isfinite(spend.noise_multiplier)
            and spend.noise_multiplier >= 0 and spend.steps >= 0):
        raise ValueError(f"implausible spend {spend}")
    return spend


class UserBudgetExhausted(FedprivError):
    """The next round would take user-level epsilon past the run's budget."""


def signing_key_path() -> Path:
    """The server's ledger-signing key: ``$FEDPRIV_LEDGER_KEY``, else under ``$FEDPRIV_HOME``
    (resolved by :func:`common.rundir.ledger_signing_key_path`)."""
    return rundir.ledger_signing_key_path()


class PrivacyRecorder:
    """The run's ledger and accounting state; with ``resume``, continued from the run's ledger."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: RestorePoint | None = None,
                 flower_run_id: int | None = None) -> None:
        self.cfg = cfg
        self.delta = cfg.privacy.delta
        key = load_or_create_signing_key(signing_key_path())
        self.ledger = LedgerWriter(run_dir, key)
        # Witnesses outside the run directory (common.witness): the server's state keeps every
        # signed head of this run and the signing key's public half, which an audit pins.
        self.witness_root = witness.witness_root()
        self.public_key_path = witness.export_public_key(self.witness_root, key.public_key())
        self.key_id = key_id(key.public_key())
        self.run_dir = run_dir
        self.client_events: dict[str, list[dp_accounting.DpEvent]] = {}
        self.user_events: list[dp_accounting.DpEvent] = []
        self.user_delta_additions: list[float] = []  # failure probabilities charged to delta
        self.user_gaussian_approximation: list[dp_accounting.DpEvent] = []  # distributed mode, for comparison
        self.refusals: list[dict[str, Any]] = []
        self.failed_rounds: list[dict[str, Any]] = []
        self.carried: set[str] = set()  # clients whose spending before this run is recorded
        self.stopped: dict[str, Any] | None = None
        # User-level spending of the earlier runs of this server state (common.population).
        self.earlier = Composition()
        parameters = {
            "config": cfg.to_flat(),
            "delta": self.delta,
            "record_budget": cfg.privacy.record_budget or None,
            "user_budget": cfg.privacy.user_budget or None,
            "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
        }
        if flower_run_id is not None:  # links the run to its submitter in the operator log
            parameters["flower_run_id"] = str(flower_run_id)
        if resume is None:
            if self.ledger.existing:
                raise FedprivError(f"{self.ledger.path} already holds a run; continue it with "
                                   f"run.resume = true (fedpriv simulate --resume {run_dir})")
            self.run_id = uuid.uuid4().hex  # fedpriv's run id: nodes tag their spends with it
            parameters.update(self._compose())
            self._witness()
            self.ledger.append(actor=SERVER, kind=Kind.RUN_START, parameters={**parameters, "run_id": self.run_id})
            return
        entries = self.ledger.existing
        resume_checks.check_ledger(resume, entries, run_dir)
        state = replay(entries)  # the one replay of the ledger (common.replay)
        resume_checks.check_settings(state, cfg)
        self.run_id = resume.run_id
        parameters.update(self._compose())
        self._witness()
        self._restore(state)
        self.ledger.append(
            actor=SERVER, kind=Kind.RUN_RESUME, round=resume.round + 1,
            parameters={**parameters, "run_id": self.run_id, "checkpoint_round": resume.round,
                        "checkpoint_ledger_entries": resume.ledger_entries},
            note=f"resumed from the checkpoint of round {resume.round}; every entry before this one "
                 f"stays counted, those after the checkpoint included",
        )

    def _compose(self) -> dict[str, Any]:
        """Read the user-level spending of the earlier runs of this server state, which the
        user-level budget is enforced on with this run's (see :mod:`common.population`); return
        what the run's start records of it."""
        if not self.cfg.user_dp.enabled:
            return {}
        self.earlier = compose_state(self.witness_root, self.run_id)
        if self.earlier.uncomposed and self.cfg.privacy.user_budget:
            first = self.earlier.uncomposed[0]
            raise FedprivError(
                f"cannot enforce privacy.user_budget: the user-level spending of the earlier run "
                f"{first['run_id']} of this server state ({self.witness_root}) cannot be read ({first['reason']}); "
                f"restore its ledger, or remove its witness record to declare it another population")
        return self.earlier.record()

    def _witness(self) -> None:
        path = witness.run_witness_path(self.witness_root, self.run_id)
        if path.is_file():  # a resume: the ledger must not be behind what this server witnessed
            try:
                seen = json.loads(path.read_text())["head"]
            except (OSError, ValueError, KeyError, TypeError):
                raise FedprivError(f"the server's witness {path} of this run is unreadable") from None
            problem = witness.prefix_problem(self.ledger.existing, seen.get("entries"), seen.get("head_hash"))
            if problem:
                raise FedprivError(f"refusing to continue {self.ledger.path}: {problem} ({path})")
        public_key = self.ledger.key.public_key()
        self.ledger.witness = lambda head: witness.write_run_witness(path, head, self.run_dir, public_key)

    def run_head(self) -> str:
        """The run ledger's head as sent to nodes, which record it in their own ledgers."""
        return witness.node_run_head(self.ledger.seq, self.ledger.prev_hash)

    def _restore(self, state: LedgerState) -> None:
        """Rebuild the accounting state from the replay of the run's verified ledger."""
        if state.unreadable:
            bad = state.unreadable[0]
            raise FedprivError(f"ledger entry {bad.seq}: its DpEvent cannot be read ({bad.note})")
        for client_id, spends in state.clients().items():
            self.client_events[client_id] = [s.event for s in spends.of_kind(Kind.RECORD_LEVEL,
                                                                              Kind.RECORD_LEVEL_CARRIED)]
            if spends.carried:
                self.carried.add(client_id)
        for spend in state.user_level():
            params = spend.parameters
            self.user_events.append(spend.event)
            self.user_delta_additions.append(spend.delta_addition)
            if params.get("gaussian_approximation_noise_multiplier") is not None:
                self.user_gaussian_approximation.append(accounting.dpfedavg_round_event(
                    float(params["gaussian_approximation_noise_multiplier"]), int(params["population"]),
                    float(params["clients_expected"]), USER_LEVEL_SAMPLING))
        self.refusals += [{"round": r.round, "node": node_of(r.actor) or r.actor, "reason": r.note}
                          for r in state.refusals if r.kind == Kind.REFUSAL]
        self.failed_rounds += [{"round": f.round, "reason": f.note} for f in state.round_failures]

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
        actor = client_actor(client_id)
        events = self.client_events.setdefault(client_id, [])
        prior = declared["prior"]
        if prior and client_id not in self.carried:  # declared in every reply; recorded once
            self.carried.add(client_id)
            carried = accounting.composed_event(prior)
            events.append(carried)
            self.ledger.append(
                actor=actor, kind=Kind.RECORD_LEVEL_CARRIED, round=server_round, event=carried,
                parameters={"spends": [s.to_json() for s in prior]}, sampling="poisson",
                epsilon={ENFORCEMENT_ACCOUNTANT: self._epsilon(events)},
                note="spending before this run, from the node's own ledger",
            )
        spend = declared["round"]
        if spend is None:
            return None
        events.append(spend.to_event())
        epsilon = self._epsilon(events)
        self.ledger.append(
            actor=actor, kind=Kind.RECORD_LEVEL, round=server_round, event=spend.to_event(),
            parameters={**spend.to_json(), "l2_norm_clip": self.cfg.dp.l2_norm_clip},
            sampling="poisson", epsilon={ENFORCEMENT_ACCOUNTANT: epsilon},
        )
        return epsilon

    def record_refusal(self, server_round: int, node: str, reason: str) -> None:
        self.refusals.append({"round": server_round, "node": node, "reason": reason})
        self.ledger.append(actor=node_actor(node), kind=Kind.REFUSAL, round=server_round, note=reason)

    # ---- user level ---------------------------------------------------------------------
    def user_round_event(self, population: int, expected: float) -> dp_accounting.DpEvent:
        return accounting.dpfedavg_round_event(
            self.cfg.user_dp.noise_multiplier, population, expected, USER_LEVEL_SAMPLING)

    def check_user_budget(self, server_round: int, population: int, expected: float,
                          worst: tuple[dp_accounting.DpEvent, float] | None = None) -> None:
        """Before a round: stop (and record why) if it could exceed the user-level budget.

        ``worst``: (event, delta addition) bounding the round, where the central mode's
        Gaussian event does not (distributed mode)."""
        budget = self.cfg.privacy.user_budget
        if not (self.cfg.user_dp.enabled and budget):
            return
        event, addition = worst or (self.user_round_event(population, expected), 0.0)
        before = self._cumulative_user_epsilon()
        after = self._cumulative_user_epsilon([event], [addition])
        if after > budget:
            earlier = (f" (composed with {len(self.earlier.runs)} earlier run(s) of this server state)"
                       if self.earlier.runs else "")
            reason = (f"round {server_round} would raise user-level epsilon{earlier} from {before:.3f} to "
                      f"{after:.3f}, above the budget of {budget:g}; ending the run")
            self.stopped = {"round": server_round, "reason": reason}
            self.ledger.append(actor=SERVER, kind=Kind.BUDGET_STOP, round=server_round,
                               epsilon={ENFORCEMENT_ACCOUNTANT: before}, note=reason)
            raise UserBudgetExhausted(reason)

    def record_user_round(self, server_round: int, population: int, expected: float, sampled: int,
                          aggregated: int, noise_multiplier: float, mechanism: dict[str, Any],
                          event: dp_accounting.DpEvent | None = None, sampling: str = USER_LEVEL_SAMPLING) -> float:
        """Record a round of user-level DP with the noise that actually applied to the sum.

        ``expected`` is q * population (the accounting's sampling rate is expected / population);
        ``sampled`` is how many the Poisson draw picked, ``aggregated`` how many contributed.
        ``event`` and ``sampling``: the round's DpEvent as the mechanism returned it
        (:class:`common.user_dp.Release`; by default the central mode's Poisson-sampled Gaussian)
        and whether it claims amplification by sampling; ``mechanism["delta_addition"]`` is
        charged to delta.
        """
        if event is None:
            event = accounting.dpfedavg_round_event(noise_multiplier, population, expected, USER_LEVEL_SAMPLING)
        approx = mechanism.get("gaussian_approximation_noise_multiplier")
        if approx is not None:  # distributed mode: the approximation, for comparison only
            self.user_gaussian_approximation.append(
                accounting.dpfedavg_round_event(approx, population, expected, USER_LEVEL_SAMPLING))
        self.user_events.append(event)
        self.user_delta_additions.append(float(mechanism.get("delta_addition") or 0.0))
        epsilon = self._user_epsilon(self.user_events)
        recorded = {ENFORCEMENT_ACCOUNTANT: epsilon}
        if self.earlier.runs:  # with the earlier runs of this server state
            recorded[CUMULATIVE] = self._cumulative_user_epsilon()
        self.ledger.append(
            actor=SERVER, kind=Kind.USER_LEVEL, round=server_round, event=event,
            parameters={
                **mechanism,
                "population": population, "sampling_probability": expected / population,
                "clients_expected": expected, "clients_sampled": sampled, "clients_aggregated": aggregated,
                "noise_multiplier": noise_multiplier,  # what the accounting uses: the noise applied
                "configured_noise_multiplier": self.cfg.user_dp.noise_multiplier,
                "clipping_norm": mechanism.get("clipping_norm", self.cfg.user_dp.clipping_norm),  # the round's
                "secure_aggregation": self.cfg.secure_aggregation.enabled,
            },
            sampling=sampling, epsilon=recorded,
            note=ASSUMPTIONS[mechanism["noise_mode"]],
        )
        return epsilon

    def record_round_failure(self, server_round: int, reason: str) -> None:
        self.failed_rounds.append({"round": server_round, "reason": reason})
        self.ledger.append(actor=SERVER, kind=Kind.ROUND_FAILED, round=server_round, note=reason)

    # ---- end ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Write the run_end entry; return the privacy figures (RDP and PLD) for the summary."""
        record = {
            cid: accounting.figures(events, self.delta)
            for cid, events in sorted(self.client_events.items(), key=lambda kv: int(kv[0]))
            if events
        }
        user = cumulative = None
        if self.cfg.user_dp.enabled:
            user = accounting.figures(self.user_events, self.delta, USER_LEVEL_SAMPLING, self.user_delta_additions)
            cumulative = accounting.figures(self.earlier.events + self.user_events, self.delta, USER_LEVEL_SAMPLING,
                                            self.earlier.delta_additions + self.user_delta_additions)
        self.ledger.append(actor=SERVER, kind=Kind.RUN_END,
                           epsilon={"record_level": record, "user_level": user,
                                    **({"user_level_cumulative": cumulative} if user is not None else {})},
                           note=self.stopped["reason"] if self.stopped else None)
        figures: dict[str, Any] = {"record_level": record, "user_level": user}
        if user is not None:  # this run's user-level spending composed with the earlier runs'
            figures["user_level_cumulative"] = cumulative
            figures["composed_runs"] = [run.run_id for run in self.earlier.runs]
            figures["uncomposed_runs"] = list(self.earlier.uncomposed)
        if self.user_gaussian_approximation:  # distributed mode: the old approximation, labelled as such
            figures["user_level_gaussian_approximation"] = accounting.epsilon_or_none(
                dp_accounting.ComposedDpEvent(self.user_gaussian_approximation), self.delta,
                ENFORCEMENT_ACCOUNTANT, USER_LEVEL_SAMPLING)
        return figures

    # ---- helpers ------------------------------------------------------------------------
    def _epsilon(self, events: list[dp_accounting.DpEvent]) -> float:
        """Enforcement figure: fails closed (infinite) on anything the accountant cannot analyse."""
        return accounting.epsilon(events, self.delta, ENFORCEMENT_ACCOUNTANT)

    def _cumulative_user_epsilon(self, events: list[dp_accounting.DpEvent] = (),
                                 additions: list[float] = ()) -> float:
        """User-level epsilon of the earlier runs of this server state, this run and ``events``."""
        return self._user_epsilon(self.earlier.events + self.user_events + list(events),
                                  self.earlier.delta_additions + self.user_delta_additions + list(additions))

    def _user_epsilon(self, events: list[dp_accounting.DpEvent], additions: list[float] | None = None) -> float:
        if events and self.cfg.user_dp.noise_multiplier == 0:
            return math.inf
        return accounting.epsilon(events, self.delta, ENFORCEMENT_ACCOUNTANT, USER_LEVEL_SAMPLING,
                                  self.user_delta_additions if additions is None else additions)
