"""Audit a run's privacy: verify the signed ledger, replay its events, check the budgets.

The replay uses fresh dp-accounting accountants on the events stored in the ledger, and never
trusts the epsilon values written beside them: those are only compared with the recomputation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from fedpriv.common import accounting
from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT
from fedpriv.common.errors import FedprivError
from fedpriv.common.rundir import NODES_DIR, state_of_run
from fedpriv.common import witness
from fedpriv.common.ledger import (
    LEDGER, PUBLIC_KEY, key_id, ledger_run_id, load_public_key, verify_ledger,
)
from fedpriv.common.ledger_schema import Kind, client_id_of
from fedpriv.common.population import COMPOSED, recheck
from fedpriv.common.replay import LedgerState, replay
from fedpriv.common.lazy import lazy_import

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

RELATIVE_TOLERANCE = 1e-6
AUDIT_MD = "audit.md"
AUDIT_PNG = "audit.png"
AUDIT_EMPIRICAL = "audit-empirical.json"  # the latest empirical audit (fedpriv audit --empirical)


@dataclass
class _Actor:
    level: str  # "record" or "user"
    sampling: str
    events: list[dp_accounting.DpEvent] = field(default_factory=list)
    by_round: dict[int, float] = field(default_factory=dict)
    # failure probabilities charged to delta (a distributed round's SecAgg+ range overflow)
    delta_additions: list[float] = field(default_factory=list)
    current: float = 0.0  # enforcement epsilon after its latest event
    history: list[tuple[int, float]] = field(default_factory=list)  # (ledger entry, epsilon after it)

    def epsilon_before(self, seq: int | None) -> float | None:
        """Its enforcement epsilon after its last event before ledger entry ``seq`` (None: the
        end); None if it had spent nothing by then."""
        before = [eps for at, eps in self.history if seq is None or at < seq]
        return before[-1] if before else None


BUDGET_KEYS = {"record_level": "record_budget", "user_level": "user_budget"}


@dataclass
class _Period:
    """The budgets in force from one run_start or run_resume entry to the next (None: no limit),
    and each actor's enforcement epsilon when the period ended."""

    seq: int
    budgets: dict[str, float | None]
    epsilon_at_end: dict[str, float] = field(default_factory=dict)


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= RELATIVE_TOLERANCE * max(1.0, abs(a), abs(b))


def submitters(flower_run_ids: list[str], log_dir: Path, public_key: Any = None) -> list[dict[str, str]]:
    """Who submitted each Flower run of this fedpriv run (a resume is a further Flower run),
    from the operator log ``log_dir``."""
    from fedpriv.common.operators import submitted_runs

    runs = submitted_runs(log_dir, public_key)
    return [{"flower_run_id": run, **runs.get(int(run), {"operator": "not in the operator log", "role": ""})}
            for run in flower_run_ids]


def default_operator_log(run_dir: Path) -> Path | None:
    """The operator log of the server state a run directory lives in (``STATE/runs/RUN``)."""
    from fedpriv.common.operators import OPERATOR_LOG

    candidate = state_of_run(run_dir) / OPERATOR_LOG
    return candidate if (candidate / LEDGER).exists() else None


def audit_run(run_dir: Path, budget: float | None = None, public_key: Path | None = None,
              operator_log: Path | None = None, node_ledgers: list[Path] | None = None) -> dict[str, Any]:
    """The audit report of ``run_dir`` as a dict (see ``fedpriv audit --json``; :func:`audited_run`)."""
    return audited_run(run_dir, budget, public_key, operator_log, node_ledgers)[0]


def audited_run(run_dir: Path, budget: float | None = None, public_key: Path | None = None,
                operator_log: Path | None = None,
                node_ledgers: list[Path] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The audit report of ``run_dir`` and the ledger entries it verified, with the key it
    resolved (for whoever reads more of the ledger than the report holds: fedpriv review).

    ``node_ledgers``: nodes' state directories (or their ``ledger.jsonl``) to cross-check with
    the run ledger; the simulated nodes' under ``RUN_DIR/nodes`` are always checked.
    """
    if not run_dir.exists():
        raise FedprivError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise FedprivError(f"not a run directory: {run_dir}")
    if not (run_dir / LEDGER).is_file():
        raise FedprivError(f"no privacy ledger ({LEDGER}) in {run_dir}")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise FedprivError(f"--budget must be a positive number, got {budget}")
    resolved = witness.resolve_audit_key(run_dir, public_key)  # pinned unless nothing outside can pin it
    key = resolved["key"]
    verified = verify_ledger(run_dir, key, crash_tail=True)  # a killed writer's tail is reported, not fatal
    failures = list(verified.failures)
    failures += _key_swap(run_dir, resolved, verified.ok)
    mismatches: list[str] = []  # recorded figures that the events do not reproduce
    full = replay(verified.entries)  # the one replay of the ledger (common.replay)
    witness_failures, witnessed = _witnesses(run_dir, resolved, verified, full, node_ledgers or [])
    failures += witness_failures
    ledger_ok = verified.ok and not witness_failures

    cutoff, problems = _structure(full)  # a ledger whose run does not start first is read up to there
    state = full if cutoff is None else replay(verified.entries[:cutoff])
    starts = [run for run in state.runs if run.kind == Kind.RUN_START]
    delta = starts[-1].delta if starts else None
    flower_runs = [run.flower_run_id for run in state.runs if run.flower_run_id]
    resumes = sum(1 for run in full.resumes if cutoff is None or run.seq <= cutoff)
    ordered: list[tuple[int, str]] = list(problems)  # failures in ledger order
    ordered += [(bad.seq, f"ledger entry {bad.seq}: its DpEvent cannot be read ({bad.note})") for bad in state.unreadable]
    relaxed: list[str] = []  # resumes that relaxed a budget in force
    periods: list[_Period] = []  # every budget ever in force, in order
    for run in state.runs:
        where = f"ledger entry {run.seq}"
        if run.kind == Kind.RUN_START:
            delta_now, run_id_now = run.delta, run.run_id
        elif periods:  # the same run, continued: every entry before it stays counted
            if run.delta != delta_now:
                ordered.append((run.seq, f"{where}: the run was resumed at delta {run.delta}, not at the "
                                          f"run's delta {delta_now}"))
            if run.run_id != run_id_now:
                ordered.append((run.seq, f"{where}: the run_resume names run {run.run_id}, not {run_id_now}"))
            relaxed += _relaxations(where, periods, _levels(run.budgets))
        periods.append(_Period(run.seq, _levels(run.budgets)))

    actors: dict[str, _Actor] = {}
    checked: list[tuple[int, str]] = []
    for name, spends in state.actors.items():
        first = spends.spends[0]
        actor = actors[name] = _Actor("user" if first.kind == Kind.USER_LEVEL else "record", spends.sampling)
        for spend in spends.spends:
            where = f"ledger entry {spend.seq}"
            at_delta = next((r.delta for r in reversed(state.runs) if r.kind == Kind.RUN_START and r.seq < spend.seq),
                            delta)
            actor.events.append(spend.event)
            if actor.level == "user":
                actor.delta_additions.append(spend.delta_addition)
            if not accounting.analysable(spend.event, ENFORCEMENT_ACCOUNTANT, actor.sampling):
                ordered.append((spend.seq, f"{where} ({name}): unanalysable event: the {ENFORCEMENT_ACCOUNTANT} "
                                           f"accountant cannot analyse its {type(spend.event).__name__}, so its "
                                           f"epsilon counts as infinite"))
            recomputed = actor.current = accounting.epsilon(actor.events, at_delta, ENFORCEMENT_ACCOUNTANT,
                                                            actor.sampling, actor.delta_additions)
            actor.history.append((spend.seq, recomputed))
            if not _close(recomputed, spend.recorded_epsilon):
                checked.append((spend.seq, f"{where} ({name}): recorded epsilon {spend.recorded_epsilon} but the "
                                           f"events give {recomputed:.6g}"))
            if spend.round is not None:
                actor.by_round[int(spend.round)] = recomputed
    mismatches += [message for _, message in sorted(checked, key=lambda item: item[0])]
    failures += [message for _, message in sorted(ordered, key=lambda item: item[0])]
    # Each budget period ends where the next run entry begins: every actor's epsilon by then.
    for period, following in zip(periods, periods[1:] + [None]):
        period.epsilon_at_end = {name: eps for name, actor in actors.items()
                                 if (eps := actor.epsilon_before(following.seq if following else None)) is not None}
    recorded_final = state.run_end.epsilon if state.run_end is not None else None
    stopped = {"round": state.stopped.round, "reason": state.stopped.note} if state.stopped is not None else None
    refusals = sum(1 for refusal in state.refusals if refusal.kind == Kind.REFUSAL)

    record_level: dict[str, dict[str, Any]] = {}
    user_level: dict[str, Any] | None = None
    for name, actor in sorted(actors.items()):
        figures = accounting.figures(actor.events, delta, actor.sampling, actor.delta_additions)
        if actor.level == "user":
            user_level = figures
        else:
            record_level[client_id_of(name) or name] = figures
    record_level = dict(sorted(record_level.items(), key=lambda kv: (len(kv[0]), kv[0])))

    if verified.entries and recorded_final is None and ledger_ok:
        failures.append("the ledger has no run_end entry (the run did not finish, or its end was removed)")
    if recorded_final is not None:
        for cid, figures in record_level.items():
            recorded = (recorded_final.get("record_level") or {}).get(cid, {}).get("rdp")
            if not _close(figures["rdp"], recorded):
                mismatches.append(f"client {cid}: run_end records epsilon {recorded}, events give {figures['rdp']:.6g}")
        if user_level is not None:
            recorded = (recorded_final.get("user_level") or {}).get("rdp")
            if not _close(user_level["rdp"], recorded):
                mismatches.append(f"user level: run_end records epsilon {recorded}, events give {user_level['rdp']:.6g}")

    if verified.entries and not (run_dir / "summary.json").exists():
        failures.append("summary.json is missing: the run's reported results cannot be checked against the ledger "
                        "(deleted, or the run did not finish)")
    mismatches += _check_summary(run_dir, record_level, user_level)
    budget_failures = relaxed + _check_budgets(actors, periods, budget)
    budgets = _strictest(periods)
    cumulative, composed, composed_failures = _composed(state, actors, delta, resolved["witness_root"])
    failures += composed_failures
    if cumulative is not None:
        recorded = ((recorded_final or {}).get("user_level_cumulative") or {}).get("rdp")
        if recorded_final is not None and not _close(cumulative["rdp"], recorded):
            mismatches.append(f"user level with the earlier runs: run_end records epsilon {recorded}, the events "
                              f"of this run and of the composed earlier runs give {cumulative['rdp']:.6g}")
        if _over(cumulative["rdp"], budgets["user_level"]):
            budget_failures.append(f"user-level epsilon {cumulative['rdp']:.4f} composed with the earlier runs of "
                                   f"this server state exceeds the user-level budget {budgets['user_level']:g}")
    failures += mismatches + budget_failures
    submitted: list[dict[str, str]] | None = None
    log_dir = operator_log or default_operator_log(run_dir)
    if log_dir is not None:
        try:
            submitted = submitters(flower_runs, log_dir, key if public_key else None)
        except FedprivError as exc:
            failures.append(str(exc))
    report = {
        "submitted_by": submitted,  # None: no operator log (a simulation, or none given)
        "run_dir": str(run_dir),
        "ok": not failures,
        "ledger_ok": ledger_ok,
        "budget_ok": not budget_failures,
        "consistent": not mismatches,
        "entries": len(verified.entries),
        "run_id": ledger_run_id(verified.entries),
        # The key the ledger was verified with, and where it came from: pinned (--public-key, or
        # the server's state outside the run directory), or trusted from ledger.pub in it.
        "key": {"fingerprint": resolved["fingerprint"], "source": resolved["source"], "pinned": resolved["pinned"]},
        "witness": str(resolved["witness"][0]) if resolved["witness"] else None,
        "node_ledgers": witnessed["node_ledgers"],
        "notes": witnessed["notes"],
        "delta": delta,
        "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
        "epsilon": {"user_level": user_level, "record_level": record_level},
        # this run's user-level spending composed with the earlier runs' of its server state
        "user_level_cumulative": cumulative,
        "composed_runs": composed,
        "budgets": {**budgets, "audit": budget},  # the strictest ever in force
        "budget_history": [{"ledger_entry": p.seq, **p.budgets} for p in periods],
        "refusals": refusals,
        "resumes": resumes,
        # What a crash left at the ledger's end: repaired on reopening (entries), or still there.
        "crash_recoveries": [recovery.note for recovery in full.recoveries]
        + verified.crash_notes,
        "stopped_early": stopped,
        "key_rotations": full.key_rotations,  # the sealing key rotated (fedpriv keys rotate)
        "failures": failures,
        "series": {
            "user_level": actors_series([a for a in actors.values() if a.level == "user"]),
            "record_level_max": actors_series([a for a in actors.values() if a.level == "record"]),
        },
    }
    return report, verified.entries


def _composed(state: LedgerState, actors: dict[str, _Actor], delta: Any,
              root: Path) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """The run's user-level epsilon composed with the earlier runs its latest run_start or
    run_resume says it composed (common.population), read again from their ledgers:
    (figures or None, the composed run ids, failures)."""
    recorded = next((run.parameters[COMPOSED] for run in reversed(state.runs) if COMPOSED in run.parameters), None)
    if recorded is None or delta is None:
        return None, [], []
    composition, failures = recheck(root, recorded)
    user = next((actor for actor in actors.values() if actor.level == "user"), None)
    events = composition.events + (user.events if user else [])
    additions = composition.delta_additions + (user.delta_additions if user else [])
    figures = accounting.figures(events, delta, user.sampling if user else "poisson", additions)
    return figures, [run.run_id for run in composition.runs], failures


def _key_swap(run_dir: Path, resolved: dict[str, Any], verified_ok: bool) -> list[str]:
    """A pinned key that the run directory's ledger.pub contradicts: named as such."""
    pub = run_dir / PUBLIC_KEY
    if not resolved["pinned"] or verified_ok or not pub.is_file():
        return []
    try:
        found = key_id(load_public_key(pub))
    except FedprivError:
        return [f"{PUBLIC_KEY} in the run directory is not a readable key"]
    if found == resolved["fingerprint"]:
        return []
    return [f"the ledger is signed by key {found} ({PUBLIC_KEY} in the run directory), not by the pinned key "
            f"{resolved['fingerprint']} from {resolved['source']}: re-signed by someone else, or made by "
            "another server (pin its key with --public-key)"]


def _witnesses(run_dir: Path, resolved: dict[str, Any], verified: Any, state: LedgerState,
               node_ledgers: list[Path]) -> tuple[list[str], dict[str, Any]]:
    """Compare the verified run ledger with its witnesses outside the run directory (the
    server's state, nodes' own ledgers; :mod:`common.witness`): (failures, notes)."""
    failures: list[str] = []
    notes: list[str] = []
    checked: list[dict[str, Any]] = []
    if verified.ok:
        run_id = ledger_run_id(verified.entries)
        found, noted = witness.check_server_witness(resolved, verified.entries, run_id)
        failures += found
        notes += noted
        if verified.head is not None and "run_id" not in verified.head:
            notes.append("the ledger's signed head is of the older format that binds no run id")
        simulated = sorted(p for p in (run_dir / NODES_DIR).glob("*") if (p / LEDGER).is_file())
        given = {p.resolve() for p in node_ledgers}
        for path in list(node_ledgers) + [p for p in simulated if p.resolve() not in given]:
            result = witness.check_node_ledger(path, run_id, verified.entries, state)
            failures += result["failures"]
            notes += result["notes"]
            checked.append(result)
        if (run_dir / NODES_DIR).is_dir() and all(c["client_id"] or not c["spends"] for c in checked):
            # Simulated nodes keep their ledgers here: every client that spent needs one.
            spent = {cid for cid, spends in state.clients().items()
                     if spends.of_kind(Kind.RECORD_LEVEL)}
            for client in sorted(spent - {c["client_id"] for c in checked}, key=lambda c: (len(c), c)):
                failures.append(f"the run ledger records spends of client {client}, but no node ledger under "
                                f"{run_dir / NODES_DIR} holds them (removed?)")
    if not resolved["pinned"]:
        notes.insert(0, f"the ledger key {resolved['fingerprint']} was TRUSTED from {PUBLIC_KEY} in the run "
                        "directory, which anyone who can write the directory can replace along with a "
                        "re-signed ledger; pin the server's key with --public-key")
    return failures, {"notes": notes, "node_ledgers": checked}


def actors_series(actors: list[_Actor]) -> dict[int, float]:
    """Per round, the largest epsilon any of ``actors`` had reached by then."""
    rounds = sorted({r for a in actors for r in a.by_round})
    series: dict[int, float] = {}
    for r in rounds:
        values = [max((v for rr, v in a.by_round.items() if rr <= r), default=0.0) for a in actors]
        series[r] = max(values)
    return series


def _over(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value > limit * (1 + 1e-9)


def _levels(budgets: dict[str, float | None]) -> dict[str, float | None]:
    """The budgets a run_start or run_resume entry put in force (replayed), by level (None: no limit)."""
    return {level: budgets.get(key) for level, key in BUDGET_KEYS.items()}


def _structure(state: LedgerState) -> tuple[int | None, list[tuple[int, str]]]:
    """Where the run ledger stops making sense, if it does: a run_resume, or a spend, before the
    run's run_start (or a run_start without delta). Returns (that entry's seq, the failure)."""
    start = next((run for run in state.runs if run.kind == Kind.RUN_START), None)
    first = start.seq if start is not None and start.delta is not None else None
    early_resume = [run.seq for run in state.resumes if first is None or run.seq < first]
    early_spend = [spend.seq for spends in state.actors.values() for spend in spends.spends
                   if first is None or spend.seq < first]
    early_spend += [bad.seq for bad in state.unreadable if first is None or bad.seq < first]
    candidates = [(seq, f"ledger entry {seq}: a run_resume before the run_start entry") for seq in early_resume]
    candidates += [(seq, f"ledger entry {seq}: a spend before the run_start entry (no delta)") for seq in early_spend]
    if not candidates:
        return None, []
    seq, message = min(candidates)
    return seq, [(seq, message)]


def _strictest(periods: list[_Period]) -> dict[str, float | None]:
    """Per level, the smallest budget ever in force (None: never limited)."""
    return {level: min((p.budgets[level] for p in periods if p.budgets[level] is not None), default=None)
            for level in BUDGET_KEYS}


def _relaxations(where: str, periods: list[_Period], new: dict[str, float | None]) -> list[str]:
    """A resume may only tighten: it may not raise a budget in force or lift it (no limit)."""
    failures = []
    for level, limit in _strictest(periods).items():
        if limit is not None and (new[level] is None or new[level] > limit):
            failures.append(f"{where}: the run_resume relaxes privacy.{BUDGET_KEYS[level]} from {limit:g} to "
                            f"{'no limit' if new[level] is None else format(new[level], 'g')}; a budget once "
                            f"in force stays in force")
    return failures


def _check_budgets(actors: dict[str, _Actor], periods: list[_Period], audit_budget: float | None) -> list[str]:
    """Each budget against each actor's epsilon when that budget was in force (at the end of its
    period), the final epsilon against the strictest budget ever in force, and ``--budget``."""
    failures = []
    strictest = _strictest(periods)
    for name, actor in sorted(actors.items(), key=lambda kv: (len(kv[0]), kv[0])):
        level = "user_level" if actor.level == "user" else "record_level"
        who = "user-level epsilon" if actor.level == "user" else \
            f"client {client_id_of(name) or name}: record-level epsilon"
        whose = "the user-level budget" if actor.level == "user" else "its record-level budget"
        over = [(period, period.epsilon_at_end[name]) for period in periods
                if name in period.epsilon_at_end and _over(period.epsilon_at_end[name], period.budgets[level])]
        for period, eps in over:
            failures.append(f"{who} {eps:.4f} exceeds {whose} {period.budgets[level]:g} (in force from "
                            f"ledger entry {period.seq})")
        if not over and _over(actor.current, strictest[level]):
            failures.append(f"{who} {actor.current:.4f} exceeds {whose} {strictest[level]:g} (the strictest "
                            f"in force during the run)")
        if _over(actor.current, audit_budget):
            failures.append(f"{who} {actor.current:.4f} exceeds --budget {audit_budget:g}")
    return failures


def _check_summary(run_dir: Path, record_level: dict[str, dict[str, Any]],
                   user_level: dict[str, Any] | None) -> list[str]:
    """summary.json must report what the ledger proves."""
    path = run_dir / "summary.json"
    if not path.exists():
        return []
    try:
        privacy = json.loads(path.read_text())["privacy"]
        reported = privacy["record_level"]["clients"]
        reported_user = privacy.get("user_level", {}).get("epsilon")
    except (ValueError, KeyError, TypeError):
        return ["summary.json is not a readable run summary"]
    failures = []
    for cid, figures in record_level.items():
        if not _close(figures["rdp"], reported.get(cid)):
            failures.append(f"summary.json reports epsilon {reported.get(cid)} for client {cid}; "
                            f"the ledger gives {figures['rdp']:.6g}")
    if user_level is not None and not _close(user_level["rdp"], reported_user):
        failures.append(f"summary.json reports user-level epsilon {reported_user}; the ledger gives "
                        f"{user_level['rdp']:.6g}")
    return failures
