"""Compliance review (``fedpriv review``): a run, a server's state (all its runs) or a node's
state, checked against a policy, control by control, with the evidence each control used.

The controls are grouped as NIST SP 800-226 (2025) groups what an evaluation of a differential
privacy guarantee must cover: the unit of privacy, the privacy parameters, the trust model, the
correctness of the implementation, the security of the deployment and the data exposure. Every
figure a control judges is recomputed: epsilon by :func:`common.audit.audit_run` (the ledger's
signatures, hash chain and witnesses verified, its DpEvents replayed through dp-accounting), the
configuration from the signed ``run_start`` entry, file modes, certificate dates and seals from the
files themselves. ``summary.json`` is read only where nothing signed holds a figure, and the
evidence says so.

A review records the ledger head of every run it saw; a later review given it (``since``)
fails control C-4 for a ledger that is now shorter, or whose entry at the witnessed head differs.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from fedpriv.common import rundir, stored_files
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger_schema import Kind, client_id_of
from fedpriv.common.replay import LedgerState, Spend, replay

REVIEW_VERSION = 1
DEFAULT_POLICY = Path(__file__).parent / "policies" / "review-default.toml"

PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "not applicable"

# NIST SP 800-226's groups, in its order
GROUPS = {
    "unit": "Unit of privacy",
    "parameters": "Privacy parameters",
    "trust": "Trust model",
    "correctness": "Correctness of the implementation",
    "deployment": "Security of the deployment",
    "exposure": "Data exposure",
}

# Each control: its id, group and the question it answers.
CONTROLS = {
    "P-1": ("unit", "Does every run protect the unit of privacy the policy requires?"),
    "P-2": ("parameters", "Is every client's record-level epsilon within the policy's maximum?"),
    "P-3": ("parameters", "Is the user-level epsilon (with the earlier runs it composes with) within the maximum?"),
    "P-4": ("parameters", "Is delta small enough for the number of records (or clients) it protects?"),
    "P-5": ("parameters", "Did every privacy budget in force hold?"),
    "T-1": ("trust", "Is noise added where the data is, rather than by a server that must be trusted to add it?"),
    "T-2": ("trust", "Was every update masked by SecAgg+, so that the server sees only sums?"),
    "T-3": ("trust", "Is each SecAgg+ secret split into enough shares?"),
    "T-4": ("trust", "Did every round aggregate enough clients to hide each one in the sum?"),
    "C-1": ("correctness", "Does the privacy ledger verify: signatures, hash chain, signed head, witnesses?"),
    "C-2": ("correctness", "Was the ledger verified with a key pinned outside the run directory?"),
    "C-3": ("correctness", "Does an independent recomputation of epsilon match every recorded figure?"),
    "C-4": ("correctness", "Is every ledger at least as long as an earlier review saw it (no rollback)?"),
    "C-5": ("correctness", "Did an empirical audit find the accounting consistent with measured leakage?"),
    "S-1": ("deployment", "Is every connection protected by TLS with the federation's CA?"),
    "S-2": ("deployment", "Are only registered, authenticated nodes admitted?"),
    "S-3": ("deployment", "Was every run submitted by an authenticated operator in a role that may?"),
    "S-4": ("deployment", "Are models, checkpoints and keys encrypted at rest?"),
    "S-5": ("deployment", "Is every stored file readable by its owner only?"),
    "S-6": ("deployment", "Are the keys younger than the policy's maximum age?"),
    "S-7": ("deployment", "Is every certificate valid today and younger than the maximum age?"),
    "S-8": ("deployment", "Do noise, sampling and SecAgg+ masks come from a CSPRNG with full-strength seeds?"),
    "D-1": ("exposure", "Is everything that left a node about its data covered by the accounting?"),
    "D-2": ("exposure", "Do the server's reports hold no statistic of an individual client?"),
}



def controls_markdown() -> str:
    """The README's table of controls."""
    lines = ["| control | group (NIST SP 800-226) | question |", "|---|---|---|"]
    lines += [f"| {cid} | {GROUPS[group]} | {question} |" for cid, (group, question) in CONTROLS.items()]
    return "\n".join(lines)


UNITS = ("record", "user", "record+user", "any")
DELTA_RULE = "1/(10N)"
# The per-round fields a run summary may hold: all the server's own (server.report.CSV_COLUMNS);
# clipping_norm is the round's user-level clip (adaptive clipping moves it from noised counts only).
SERVER_ROUND_FIELDS = {"round", "accuracy", "loss", "record_epsilon_max", "user_epsilon", "clipping_norm",
                       "clients_trained", "clients_failed", "seconds", "failed"}
REVIEWS_DIR = "reviews"
NODE_DELTA = 1e-5  # privacy.delta's default: a node's ledger records its spends, not the delta it reports at  # TARGET/reviews/<UTC time>/: the default output


class PolicyError(FedprivError):
    pass


@dataclass(frozen=True)
class Policy:
    unit: str = "record"
    max_record_epsilon: float = 10.0
    max_user_epsilon: float = 10.0
    max_delta: str | float = DELTA_RULE
    server_may_add_noise: bool = False
    secagg_required: bool = True
    min_shares: int = 3
    min_clients_per_round: int = 3
    tls_required: bool = True
    node_authentication_required: bool = True
    operator_authentication_required: bool = True
    encryption_required: bool = True
    protected_keys_required: bool = False
    max_key_age_days: float = 365
    max_certificate_age_days: float = 398
    empirical_audit_required: bool = False


# policy file section -> {key in the file: Policy field}
POLICY_KEYS = {
    "privacy": {"unit": "unit", "max_record_epsilon": "max_record_epsilon", "max_user_epsilon": "max_user_epsilon",
                "max_delta": "max_delta"},
    "trust": {"server_may_add_noise": "server_may_add_noise"},
    "secure_aggregation": {"required": "secagg_required", "min_shares": "min_shares"},
    "federation": {"min_clients_per_round": "min_clients_per_round"},
    "access": {"tls_required": "tls_required", "node_authentication_required": "node_authentication_required",
               "operator_authentication_required": "operator_authentication_required"},
    "at_rest": {"encryption_required": "encryption_required", "protected_keys_required": "protected_keys_required",
                "max_key_age_days": "max_key_age_days", "max_certificate_age_days": "max_certificate_age_days"},
    "release": {"empirical_audit_required": "empirical_audit_required"},
}


def load_policy(path: Path | None) -> tuple[Policy, str]:
    """The policy in ``path`` (None: the default policy) and its source; every problem is one
    :class:`PolicyError` line."""
    from fedpriv.common.config import read_toml

    source = DEFAULT_POLICY if path is None else Path(path)
    raw = read_toml(source, "policy")
    types = {f.name: f.type for f in fields(Policy)}
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in POLICY_KEYS or not isinstance(table, dict):
            raise PolicyError(f"policy {source}: unknown section [{section}] (known: {', '.join(POLICY_KEYS)})")
        for key, value in table.items():
            name = POLICY_KEYS[section].get(key)
            if name is None:
                raise PolicyError(f"policy {source}: unknown key {section}.{key} "
                                  f"(known: {', '.join(POLICY_KEYS[section])})")
            values[name] = _policy_value(source, f"{section}.{key}", name, types[name], value)
    return Policy(**values), "default" if path is None else str(source)


def _policy_value(source: Path, where: str, name: str, kind: str, value: Any) -> Any:
    bad = f"policy {source}: {where} = {value!r} is not "
    if kind == "bool":
        if not isinstance(value, bool):
            raise PolicyError(bad + "true or false")
        return value
    if name == "unit":
        if value not in UNITS:
            raise PolicyError(bad + f"one of {', '.join(UNITS)}")
        return value
    if name == "max_delta":
        if value == DELTA_RULE:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise PolicyError(bad + f'"{DELTA_RULE}" or a number between 0 and 1')
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PolicyError(bad + "a number of 0 or more")
    if name in ("min_shares", "min_clients_per_round"):
        if value != int(value):
            raise PolicyError(bad + "a whole number")
        return int(value)
    return float(value)


# ---- targets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    kind: str  # "run", "server state" or "node state"
    path: Path
    runs: list[Path]
    state: Path | None  # the server state around the runs (a deployment), if any
    keys: Path | None  # where the deployment's keys and certificates are


def find_target(path: Path, keys: Path | None = None) -> Target:
    """What ``path`` is: a run directory, a server state directory, or a node's state."""
    from fedpriv.common.ledger import LEDGER

    path = Path(path)
    if not path.exists():
        raise FedprivError(f"nothing to review at {path}: no such directory")
    if not path.is_dir():
        raise FedprivError(f"{path} is not a directory (review a run directory, a server state or a node state)")
    if (path / rundir.STATE_RUNS).is_dir() and not (path / LEDGER).exists():
        runs = sorted(p for p in (path / rundir.STATE_RUNS).iterdir() if (p / LEDGER).is_file())
        if not runs:
            raise FedprivError(f"server state {path} holds no run with a ledger under {rundir.STATE_RUNS}/")
        return Target("server state", path, runs, path, keys or _state_keys(path))
    if (path / LEDGER).is_file():
        first = _first_entry(path / LEDGER)
        if first.get("kind") == Kind.RUN_START:
            state = rundir.state_of_run(path)
            deployed = (state / rundir.STATE_DATABASE).exists() and path.resolve().parent.name == rundir.STATE_RUNS
            return Target("run", path, [path], state if deployed else None,
                          keys or (_state_keys(state) if deployed else None))
        return Target("node state", path, [], None, keys)
    raise FedprivError(f"{path} is not a run directory, a server state or a node state (no ledger.jsonl, "
                       f"no {rundir.STATE_RUNS}/ of runs)")


def _state_keys(state: Path) -> Path | None:
    link = state / rundir.STATE_KEYS_LINK
    return link if link.is_dir() else None


def _first_entry(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            first = json.loads(handle.readline() or b"{}")
    except (OSError, ValueError):
        return {}
    return first if isinstance(first, dict) else {}


# ---- controls ----------------------------------------------------------------------------------
def control(cid: str, status: str, reason: str, evidence: dict[str, Any] | None = None,
            run: str | None = None) -> dict[str, Any]:
    group, question = CONTROLS[cid]
    return {"id": cid, "group": group, "question": question, "status": status, "reason": reason,
            "evidence": evidence or {}, "run": run}


def _verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def _eps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@dataclass
class RunFacts:
    """What the review knows of one run: its audit, the ledger entries the audit verified and
    their replay (common.replay), and its summary."""

    run_dir: Path
    audit: dict[str, Any]
    entries: list[dict[str, Any]]
    state: LedgerState
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def run_id(self) -> str | None:
        return self.audit["run_id"]

    @property
    def configs(self) -> list[dict[str, Any]]:
        """Every configuration the run's run_start and run_resume entries put in force, in order."""
        return [run.config for run in self.state.runs if run.config is not None]

    @property
    def config(self) -> dict[str, Any]:
        return self.state.config or {}

    @property
    def record_spends(self) -> list[Spend]:
        """Every client's DP-SGD spends of this run (not spending carried from before it)."""
        return [spend for spends in self.state.clients().values() for spend in spends.of_kind(Kind.RECORD_LEVEL)]


def run_facts(run_dir: Path, public_key: Path | None) -> RunFacts:
    """The run's audit, the entries it verified (with the key it resolved from ``public_key``)
    and their replay, and the run's summary."""
    from fedpriv.common.audit import audited_run

    audit, entries = audited_run(run_dir, public_key=public_key)
    return facts_of(run_dir, audit, entries)


def facts_of(run_dir: Path, audit: dict[str, Any], entries: list[dict[str, Any]]) -> RunFacts:
    """:class:`RunFacts` from an audit already made (``common.audit.audited_run``)."""
    try:
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    return RunFacts(run_dir, audit, entries, replay(entries), summary if isinstance(summary, dict) else None)


def _record_sizes(facts: RunFacts) -> dict[str, int]:
    """Per client, its records as its DP-SGD sampling implies (batch size / sampling rate)."""
    batch = facts.config.get("client.batch_size")
    sizes: dict[str, int] = {}
    for spend in facts.record_spends:
        q = spend.parameters.get("sampling_probability")
        if isinstance(q, (int, float)) and q > 0 and isinstance(batch, (int, float)):
            cid = client_id_of(spend.actor)
            sizes[cid] = min(sizes.get(cid, 1 << 62), int(round(batch / q)))
    return sizes


def run_controls(facts: RunFacts, policy: Policy, now: _dt.datetime,
                 witnessed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The controls that judge one run (P, T, C and D; the deployment's are separate)."""
    audit, run, config = facts.audit, facts.run_id or facts.name, facts.config
    out: list[dict[str, Any]] = []
    record = audit["epsilon"]["record_level"]
    user = audit["epsilon"]["user_level"]
    cumulative = audit["user_level_cumulative"]
    has_record, has_user = bool(record), user is not None
    units = {"record": has_record, "user": has_user}
    wanted = {"record": ["record"], "user": ["user"], "record+user": ["record", "user"], "any": []}[policy.unit]
    unit_ok = all(units[u] for u in wanted) and (has_record or has_user)
    protected = [u for u, on in units.items() if on]
    out.append(control("P-1", _verdict(unit_ok),
                       f"the run protects {' and '.join(f'{u}s' for u in protected) or 'no unit (no DP)'}; "
                       f"the policy requires {policy.unit}",
                       {"record_level_spends": len(facts.record_spends),
                        "user_level_rounds": len(facts.state.user_level()),
                        "dp.enabled": config.get("dp.enabled"), "user_dp.enabled": config.get("user_dp.enabled"),
                        "source": "the signed ledger (run_start configuration and spends)"}, run))

    if has_record:
        worst = max(record.items(), key=lambda kv: kv[1]["rdp"] if kv[1]["rdp"] is not None else math.inf)
        eps = worst[1]["rdp"]
        ok = eps is not None and eps <= policy.max_record_epsilon
        out.append(control("P-2", _verdict(ok), f"largest record-level epsilon {_eps(eps)} (client {worst[0]}); "
                           f"maximum {policy.max_record_epsilon:g}",
                           {"epsilon_by_client": {c: f["rdp"] for c, f in record.items()},
                            "epsilon_pld_by_client": {c: f.get("pld") for c, f in record.items()},
                            "delta": audit["delta"], "accountant": audit["enforcement_accountant"],
                            "source": "recomputed from the ledger's DpEvents (fedpriv audit)"}, run))
    else:
        out.append(control("P-2", NOT_APPLICABLE, "the run has no record-level DP", run=run))
    if has_user:
        figures = cumulative or user
        eps = figures["rdp"]
        ok = eps is not None and eps <= policy.max_user_epsilon
        out.append(control("P-3", _verdict(ok), f"user-level epsilon {_eps(eps)}"
                           f"{' composed with ' + str(len(audit['composed_runs'])) + ' earlier run(s)' if cumulative else ''}"
                           f"; maximum {policy.max_user_epsilon:g}",
                           {"epsilon": user, "epsilon_composed": cumulative, "composed_runs": audit["composed_runs"],
                            "delta": audit["delta"], "source": "recomputed from the ledger's DpEvents (fedpriv audit)"},
                           run))
    else:
        out.append(control("P-3", NOT_APPLICABLE, "the run has no user-level DP", run=run))

    delta = audit["delta"]
    sizes = _record_sizes(facts)
    limits: dict[str, float] = {}
    if isinstance(policy.max_delta, float):
        limits = {unit: policy.max_delta for unit in protected}
    else:
        if has_record and sizes:
            limits["record"] = 1 / (10 * min(sizes.values()))
        population = config.get("federation.num_clients")
        if has_user and isinstance(population, int) and population > 0:
            limits["user"] = 1 / (10 * population)
    if not protected:
        out.append(control("P-4", NOT_APPLICABLE, "the run has no DP, so no delta", run=run))
    elif delta is None or not limits:
        out.append(control("P-4", FAIL, "the run's delta, or the number N it protects, cannot be read from its ledger",
                           {"delta": delta}, run))
    else:
        worst_unit = min(limits, key=lambda u: limits[u])
        ok = all(delta <= limit * (1 + 1e-9) for limit in limits.values())
        out.append(control("P-4", _verdict(ok), f"delta {delta:g}; the policy allows at most {limits[worst_unit]:.3g} "
                           f"({policy.max_delta if isinstance(policy.max_delta, str) else 'fixed'}, {worst_unit} level)",
                           {"delta": delta, "limits": limits, "records_per_client_min": min(sizes.values()) if sizes else None,
                            "population": config.get("federation.num_clients"), "rule": policy.max_delta,
                            "source": "records per client from each DP-SGD spend (batch size / sampling rate)"}, run))
    budget_failures = [f for f in audit["failures"] if "budget" in f]
    out.append(control("P-5", _verdict(audit["budget_ok"]),
                       "every budget in force held" if audit["budget_ok"] else budget_failures[0] if budget_failures
                       else "a budget did not hold",
                       {"budgets": audit["budgets"], "budget_history": audit["budget_history"],
                        "refusals": audit["refusals"], "stopped_early": audit["stopped_early"]}, run))

    # ---- trust model
    noise_mode = config.get("user_dp.noise_mode")
    local_noise = has_record or (has_user and noise_mode == "distributed")
    where = []
    if has_record:
        where.append("DP-SGD noise on each node")
    if has_user:
        where.append(f"user-level noise {'shared among the nodes, under SecAgg+' if noise_mode == 'distributed' else 'added by the server (central)'}")
    if not (has_record or has_user):
        out.append(control("T-1", FAIL, "no noise is added anywhere", run=run))
    else:
        ok = local_noise or policy.server_may_add_noise
        out.append(control("T-1", _verdict(ok), "; ".join(where) + (
            "" if local_noise else " only: the server is trusted to add the noise"),
            {"dp.enabled": config.get("dp.enabled"), "user_dp.noise_mode": noise_mode if has_user else None,
             "server_may_add_noise": policy.server_may_add_noise}, run))
    secagg = [bool(c.get("secure_aggregation.enabled")) for c in facts.configs]
    secagg_on = bool(secagg) and all(secagg)
    if policy.secagg_required or secagg_on:
        out.append(control("T-2", _verdict(secagg_on or not policy.secagg_required),
                           "SecAgg+ masked every update" if secagg_on else
                           "SecAgg+ was off (secure_aggregation.enabled = false) in "
                           f"{secagg.count(False)} of the run's {len(secagg)} start/resume configuration(s)",
                           {"secure_aggregation.enabled": secagg, "source": "the signed run_start/run_resume entries"},
                           run))
    else:
        out.append(control("T-2", NOT_APPLICABLE, "the policy does not require SecAgg+, and the run did not use it",
                           run=run))
    shares = _shares(config) if secagg_on else None
    if shares is None:
        out.append(control("T-3", NOT_APPLICABLE, "no SecAgg+ in the run", run=run))
    else:
        out.append(control("T-3", _verdict(shares[0] >= policy.min_shares),
                           f"{shares[0]} shares, {shares[1]} needed to rebuild a secret; minimum {policy.min_shares}",
                           {"num_shares": shares[0], "reconstruction_threshold": shares[1]}, run))
    per_round, source = _clients_per_round(facts)
    if not per_round:
        out.append(control("T-4", NOT_APPLICABLE, "no round aggregated any update", run=run))
    else:
        fewest = min(per_round.values())
        out.append(control("T-4", _verdict(fewest >= policy.min_clients_per_round),
                           f"the fewest clients in a round: {fewest} (round {min(per_round, key=per_round.get)}); "
                           f"minimum {policy.min_clients_per_round}",
                           {"clients_per_round": per_round, "source": source}, run))

    # ---- correctness
    ledger_failures = [f for f in audit["failures"] if f not in budget_failures]
    out.append(control("C-1", _verdict(audit["ledger_ok"]),
                       f"{audit['entries']} entries, chain, signatures and head verified"
                       + ("" if audit["ledger_ok"] else f": {ledger_failures[0] if ledger_failures else 'it does not'}"),
                       {"entries": audit["entries"], "key": audit["key"], "witness": audit["witness"],
                        "node_ledgers": len(audit["node_ledgers"]), "crash_recoveries": audit["crash_recoveries"],
                        "key_rotations": len(audit["key_rotations"])}, run))
    out.append(control("C-2", _verdict(audit["key"]["pinned"]),
                       f"key {audit['key']['fingerprint']} from {audit['key']['source']}"
                       + ("" if audit["key"]["pinned"] else ": trusted from the run directory itself"),
                       dict(audit["key"]), run))
    out.append(control("C-3", _verdict(audit["consistent"]),
                       "every recorded epsilon and summary.json agree with the recomputation" if audit["consistent"]
                       else "a recorded figure differs from the recomputation",
                       {"failures": [f for f in audit["failures"] if "give" in f or "reports" in f]}, run))
    out.append(_rollback(facts, witnessed, run))
    out.append(_empirical(facts, policy, run))

    # ---- data exposure
    trained = _trained_rounds(facts)
    covered = has_record or has_user
    if not trained:
        out.append(control("D-1", NOT_APPLICABLE, "no client trained", run=run))
    else:
        covered_by = "record-level DP-SGD spends" if has_record else "user-level DP" if has_user else "nothing"
        out.append(control("D-1", _verdict(covered and audit["ledger_ok"]),
                           f"every update of {len(trained)} client(s) is covered by {covered_by}; "
                           f"{len(audit['node_ledgers'])} node ledger(s) cross-checked with the run's" if covered else
                           "updates left the nodes without differential privacy",
                           {"clients": len(trained), "node_ledgers_checked": len(audit["node_ledgers"]),
                            "covered_by": covered_by}, run))
    rounds = (facts.summary or {}).get("rounds") or []
    extra = sorted({k for r in rounds if isinstance(r, dict) for k in r} - SERVER_ROUND_FIELDS)
    out.append(control("D-2", _verdict(not extra),
                       "summary.json's rounds hold only the server's own figures" if not extra else
                       f"summary.json's rounds hold fields that are not the server's own: {', '.join(extra)}",
                       {"round_fields": sorted({k for r in rounds if isinstance(r, dict) for k in r})}, run))
    return out


def _shares(config: dict[str, Any]) -> tuple[int, int] | None:
    from fedpriv.common.config import RunConfig

    try:
        return RunConfig.from_flat(config).secagg_shares()
    except (FedprivError, TypeError, ValueError):
        return None


def _clients_per_round(facts: RunFacts) -> tuple[dict[int, int], str]:
    """Clients whose update each round aggregated: from the signed spends where there are, else
    from summary.json."""
    spends: dict[int, set[str]] = {}
    for spend in facts.record_spends:
        if spend.round is not None:
            spends.setdefault(int(spend.round), set()).add(spend.actor)
    if spends:
        return {r: len(a) for r, a in sorted(spends.items())}, "the signed ledger's record-level spends"
    rounds = (facts.summary or {}).get("rounds") or []
    counts = {int(r["round"]): int(r["clients_trained"]) for r in rounds
              if isinstance(r, dict) and isinstance(r.get("clients_trained"), int) and r.get("failed") is None}
    return counts, "summary.json (unsigned: no record-level spends to count)"


def _trained_rounds(facts: RunFacts) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for spend in facts.record_spends:
        out.setdefault(spend.actor, []).append(spend.round)
    if not out:
        rounds = (facts.summary or {}).get("rounds") or []
        if any(isinstance(r, dict) and (r.get("clients_trained") or 0) > 0 for r in rounds):
            out["(clients, by summary.json)"] = [r.get("round") for r in rounds if isinstance(r, dict)]
    return out


def _rollback(facts: RunFacts, witnessed: dict[str, Any] | None, run: str) -> dict[str, Any]:
    from fedpriv.common.witness import prefix_problem

    if witnessed is None:
        return control("C-4", NOT_APPLICABLE, "no earlier review given (--since)", run=run)
    seen = witnessed.get(facts.run_id or "")
    if seen is None:
        return control("C-4", NOT_APPLICABLE, "the earlier review did not see this run", run=run)
    problem = prefix_problem(facts.entries, seen.get("entries"), seen.get("head_hash"))
    now = {"entries": len(facts.entries), "head_hash": facts.entries[-1]["hash"] if facts.entries else None}
    return control("C-4", FAIL if problem else PASS,
                   f"rolled back since the earlier review: {problem}" if problem else
                   f"{now['entries']} entries now, {seen.get('entries')} at the earlier review, which is a prefix",
                   {"earlier": seen, "now": now}, run)


def _empirical(facts: RunFacts, policy: Policy, run: str) -> dict[str, Any]:
    from fedpriv.common.audit import AUDIT_EMPIRICAL
    from fedpriv.common.empirical import VERDICT_CONSISTENT

    path = facts.run_dir / AUDIT_EMPIRICAL
    if not path.is_file():
        if policy.empirical_audit_required:
            return control("C-5", FAIL, f"no empirical audit ({AUDIT_EMPIRICAL}): run fedpriv audit --empirical",
                           run=run)
        return control("C-5", NOT_APPLICABLE, "no empirical audit, and the policy does not require one", run=run)
    try:
        result = json.loads(path.read_text())
        verdict = result["verdict"]
    except (OSError, ValueError, KeyError, TypeError):
        return control("C-5", FAIL, f"{AUDIT_EMPIRICAL} is not readable", run=run)
    if result.get("skipped"):
        ok = not policy.empirical_audit_required
        return control("C-5", PASS if ok else FAIL, f"the empirical audit was not run: {result['skipped']}", run=run)
    evidence = {k: result.get(k) for k in ("verdict", "epsilon_lower_bound", "accounted_epsilon", "confidence",
                                           "canaries")}
    return control("C-5", _verdict(verdict == VERDICT_CONSISTENT),
                   f"measured lower bound {_eps(result.get('epsilon_lower_bound'))} against accounted "
                   f"{_eps(result.get('accounted_epsilon'))}: {verdict}", evidence, run)


# ---- the deployment's controls ----------------------------------------------------------------------
def _mode_offenders(roots: list[Path]) -> tuple[int, list[str]]:
    """Files and directories under ``roots`` that a group or others may access (symlinks are
    not followed: a link's target is checked where it is a root of its own)."""
    checked, offenders = 0, []
    for root in roots:
        if not root.exists():
            continue
        walk: list[Path] = [root]
        while walk:
            path = walk.pop()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            checked += 1
            if info.st_mode & 0o077:
                offenders.append(f"{path} ({stat.filemode(info.st_mode)})")
            if stat.S_ISDIR(info.st_mode):
                walk.extend(sorted(path.iterdir()))
    return checked, sorted(offenders)


def _age_days(seconds: float, now: _dt.datetime) -> float:
    return (now.timestamp() - seconds) / 86400


def deployment_controls(target: Target, facts: list[RunFacts], policy: Policy, now: _dt.datetime,
                        extra_roots: list[Path]) -> list[dict[str, Any]]:
    """S-1 to S-8: how the deployment (or the machine of a simulation) keeps its runs."""
    from fedpriv.common import checkpoint, keyfiles
    from fedpriv.common.checkpoint import CHECKPOINT

    out: list[dict[str, Any]] = []
    deployed = target.state is not None
    simulation = "a local simulation: no network, no nodes of other parties, no operators"
    certificates = _certificates(target.keys) if target.keys is not None else {}
    if not deployed and target.kind != "node state":
        for cid in ("S-1", "S-2", "S-3"):
            out.append(control(cid, NOT_APPLICABLE, simulation))
    elif target.kind == "node state":
        for cid in ("S-1", "S-2", "S-3"):
            out.append(control(cid, NOT_APPLICABLE, "a node's own state: its connections are judged in the "
                                                    "server's review"))
    else:
        out += _access_controls(target, facts, policy, certificates)

    # S-4: sealed at rest
    problems, evidence = [], {"sealed": [], "keys": {}}
    for f in facts:
        for name in (rundir.MODEL, CHECKPOINT):
            path = f.run_dir / name
            if path.exists():
                try:
                    binding, _ = checkpoint.binding_of(path.read_bytes(), str(path))
                    if binding["run"] != f.run_id:
                        problems.append(f"{path} is bound to run {binding['run']}, not {f.run_id}")
                    evidence["sealed"].append(str(path))
                except FedprivError as exc:
                    problems.append(str(exc))
        for path in sorted(f.run_dir.rglob("*")):
            relative = path.relative_to(f.run_dir).as_posix()
            if path.is_file() and stored_files.entry_for(stored_files.RUN, relative) is None:
                problems.append(f"{path} is a file fedpriv does not write (a plaintext copy?)")
        if not (f.run_dir / rundir.MODEL).exists() and (f.summary or {}).get("final_accuracy") is not None:
            evidence.setdefault("notes", []).append(f"{f.run_dir} keeps no model (run without a sealing key)")
    keys = _key_files(target)
    for path in keys:
        data = path.read_bytes() if path.is_file() else b""
        evidence["keys"][str(path)] = "protected" if keyfiles.is_protected(data) else "plain"
        if policy.protected_keys_required and not keyfiles.is_protected(data):
            problems.append(f"the key {path} is not passphrase-protected")
    if not policy.encryption_required and not policy.protected_keys_required:
        out.append(control("S-4", NOT_APPLICABLE, "the policy requires no encryption at rest", evidence))
    else:
        out.append(control("S-4", _verdict(not problems),
                           problems[0] if problems else f"{len(evidence['sealed'])} sealed file(s) bound to their run; "
                           f"{len(keys)} key file(s)" + (", all protected" if policy.protected_keys_required else ""),
                           {**evidence, "problems": problems}))

    # S-5: owner-only
    roots = [target.path] + ([target.keys.resolve()] if target.keys is not None else []) + extra_roots
    checked, offenders = _mode_offenders(roots)
    out.append(control("S-5", _verdict(not offenders),
                       f"{checked} files and directories checked, all owner-only" if not offenders else
                       f"{len(offenders)} of {checked} may be read by others: {offenders[0]}",
                       {"roots": [str(r) for r in roots], "checked": checked, "offenders": offenders}))

    # S-6: key age
    exact = {str(p): _age_days(p.stat().st_mtime, now) for p in keys if p.exists()}
    ages = {p: round(a, 1) for p, a in exact.items()}
    old = {p: a for p, a in exact.items() if a > policy.max_key_age_days}
    out.append(control("S-6", _verdict(not old) if ages else NOT_APPLICABLE,
                       (f"oldest key {max(ages.values()):.0f} days; maximum {policy.max_key_age_days:g}" if not old else
                        f"{next(iter(old))} is {next(iter(old.values())):.0f} days old; maximum "
                        f"{policy.max_key_age_days:g}") if ages else "no key files found",
                       {"age_days": ages, "source": "each key file's last change (mtime)"}))

    # S-7: certificates
    if not certificates:
        out.append(control("S-7", NOT_APPLICABLE, "no certificates (a local simulation, or no key directory given)"))
    else:
        bad = []
        for path, cert in certificates.items():
            if isinstance(cert, str):
                bad.append(f"{path}: {cert}")
                continue
            if now < cert.not_valid_before_utc:
                bad.append(f"{path} is not valid until {cert.not_valid_before_utc:%Y-%m-%d}")
            elif now > cert.not_valid_after_utc:
                bad.append(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
            elif (now - cert.not_valid_before_utc).days > policy.max_certificate_age_days:
                bad.append(f"{path} is {(now - cert.not_valid_before_utc).days} days old; maximum "
                           f"{policy.max_certificate_age_days:g}")
        out.append(control("S-7", _verdict(not bad), bad[0] if bad else f"{len(certificates)} certificate(s) valid",
                           {"certificates": {p: c if isinstance(c, str) else {
                               "subject": c.subject.rfc4514_string(),
                               "not_before": c.not_valid_before_utc.isoformat(),
                               "not_after": c.not_valid_after_utc.isoformat()} for p, c in certificates.items()},
                            "problems": bad}))
    out.append(_randomness())
    return out


def _access_controls(target: Target, facts: list[RunFacts], policy: Policy,
                     certificates: dict[str, Any]) -> list[dict[str, Any]]:
    from fedpriv.common.keys import CA_CERT, NODES_DIR, ROSTER, SUPERLINK_CERT
    from fedpriv.common.roster import check_roster_file
    from fedpriv.common.tls import check_issued_by

    out = []
    keys = target.keys
    ca, cert = certificates.get(str(keys / CA_CERT)) if keys else None, \
        certificates.get(str(keys / SUPERLINK_CERT)) if keys else None
    if ca is None or cert is None or isinstance(ca, str) or isinstance(cert, str):
        tls = (FAIL, "the deployment's CA or SuperLink certificate is missing or unreadable "
                     f"({keys or 'no key directory: give --keys'})")
    else:
        try:
            check_issued_by(cert, ca, "the SuperLink certificate")
            tls = (PASS, "fedpriv server start serves every port with TLS only; the SuperLink certificate "
                         f"({cert.subject.rfc4514_string()}) is issued by the federation CA")
        except FedprivError as exc:
            tls = (FAIL, str(exc))
    out.append(control("S-1", tls[0] if policy.tls_required else NOT_APPLICABLE, tls[1],
                       {"keys": str(keys) if keys else None}))
    roster_state = (FAIL, "no signed node roster")
    node_keys = sorted((keys / NODES_DIR).glob("*.pub")) if keys is not None else []
    if keys is not None and (keys / ROSTER).is_file() and not isinstance(ca, (str, type(None))):
        try:
            roster = check_roster_file(keys / ROSTER, keys / CA_CERT, node_keys)
            roster_state = (PASS, f"the SuperLink runs with --enable-supernode-auth; the CA-signed roster names "
                                  f"{len(roster.nodes)} node key(s), each of the {len(node_keys)} in the key "
                                  "directory among them")
        except FedprivError as exc:
            roster_state = (FAIL, f"the node roster does not verify: {exc}")
    out.append(control("S-2", roster_state[0] if policy.node_authentication_required else NOT_APPLICABLE,
                       roster_state[1], {"roster": str(keys / ROSTER) if keys else None}))
    unknown = [(f.name, s) for f in facts for s in (f.audit["submitted_by"] or [])
               if s.get("operator") == "not in the operator log"]
    missing_log = [f.name for f in facts if f.audit["submitted_by"] is None]
    operators = (target.state / rundir.STATE_OPERATORS).is_file() if target.state else False
    ok = operators and not unknown and not missing_log
    who = sorted({f"{s['operator']} ({s.get('role')})" for f in facts for s in (f.audit["submitted_by"] or [])})
    reason = (f"every run was submitted through the operators' port (mutual TLS, by role): {', '.join(who)}" if ok else
              "no operators' port in the state" if not operators else
              f"run {missing_log[0]} has no operator log" if missing_log else
              f"run {unknown[0][0]}: Flower run {unknown[0][1]['flower_run_id']} is not in the signed operator log")
    out.append(control("S-3", _verdict(ok) if policy.operator_authentication_required else NOT_APPLICABLE, reason,
                       {"submitted_by": {f.name: f.audit["submitted_by"] for f in facts}}))
    return out


def _certificates(keys: Path) -> dict[str, Any]:
    """Every certificate in the key directory (and its operators/), parsed; a string where one
    is not readable."""
    from cryptography import x509

    out: dict[str, Any] = {}
    for path in sorted(list(keys.glob("*.crt")) + list(keys.glob("operators/*.crt"))):
        try:
            out[str(path)] = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            out[str(path)] = f"not a readable PEM certificate ({exc})"
    return out


def _key_files(target: Target) -> list[Path]:
    """The private keys that protect the target's runs: the deployment's key directory, the
    simulations' keys in $FEDPRIV_HOME, or the node's own key."""
    from fedpriv.common import keys as keydefs

    if target.kind == "node state":
        return [p for p in [target.path / rundir.NODE_KEY] if p.is_file()]
    if target.keys is not None:
        names = [keydefs.CA_KEY, keydefs.SUPERLINK_KEY, keydefs.LEDGER_KEY, keydefs.APP_KEY, rundir.CHECKPOINT_KEY]
        found = [target.keys / n for n in names]
        found += sorted(p for p in (target.keys / keydefs.NODES_DIR).glob("node-*") if p.suffix != ".pub")
        found += sorted((target.keys / "operators").glob("*.key"))
        return [p for p in found if p.is_file()]
    home = rundir.home_keys_dir()
    return [p for p in (home / rundir.LEDGER_SIGNING_KEY, home / rundir.CHECKPOINT_KEY) if p.is_file()]


def _randomness() -> dict[str, Any]:
    from fedpriv.common import entropy

    return control("S-8", PASS, "by construction of this fedpriv version: every draw a privacy claim rests on "
                   "starts from the operating system's CSPRNG; run.seed seeds only model initialisation and "
                   "the data split",
                   {"dp_sgd_noise": f"AES-256-CTR keystream, Box-Muller; a fresh {entropy.NOISE_SEED_BITS}-bit seed "
                                    "from os.urandom every step (common/entropy.py)",
                    "poisson_sampling": f"numpy Philox4x64-10, {entropy.NUMPY_PHILOX_BITS} bits from os.urandom",
                    "user_level_noise_and_client_sampling": "os.urandom (common/secagg.py)",
                    "secagg_masks": "expanded from the full 256-bit seed (common/secagg_masks.py)",
                    "tests": "tests/test_noise_entropy.py, tests/test_secagg_attacks.py"})


# ---- node state ----------------------------------------------------------------------------------
def node_controls(path: Path, policy: Policy, witnessed: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A node's own state: its ledger, and its record-level epsilon over every run it trained in."""
    from fedpriv.common import accounting
    from fedpriv.common.ledger import LEDGER, key_id, load_public_key, verify_ledger

    report = verify_ledger(path, crash_tail=True)
    name = path.name
    out = [control("C-1", _verdict(report.ok), f"{len(report.entries)} entries verified with the node's own key"
                   if report.ok else report.failures[0], {"entries": len(report.entries)}, name)]
    pub = path / "ledger.pub"
    out.append(control("C-2", PASS, "a node's ledger is signed with its own key, which it keeps (node.key)",
                       {"fingerprint": key_id(load_public_key(pub)) if pub.is_file() else None}, name))
    state = replay(report.entries)
    spends = [s for actor in state.actors.values() for s in actor.spends]
    by_run: dict[str, list[Any]] = {}
    for spend in spends:
        by_run.setdefault(str(spend.parameters.get("run_id")), []).append(spend)
    delta = NODE_DELTA  # a node ledger records no delta
    if spends:
        events = [s.event for s in spends]
        total = accounting.epsilon(events, delta)
        out.append(control("P-2", _verdict(total <= policy.max_record_epsilon),
                           f"record-level epsilon {total:.4f} over {len(by_run)} run(s) ({len(spends)} spends); "
                           f"maximum {policy.max_record_epsilon:g}",
                           {"epsilon": total, "delta": delta, "runs": sorted(by_run),
                            "source": "the node's own signed ledger, recomputed with dp-accounting"}, name))
    else:
        out.append(control("P-2", NOT_APPLICABLE, "the node has spent nothing", run=name))
    if witnessed is not None and name in witnessed:
        from fedpriv.common.witness import prefix_problem

        seen = witnessed[name]
        problem = prefix_problem(report.entries, seen.get("entries"), seen.get("head_hash"))
        out.append(control("C-4", FAIL if problem else PASS, problem or "no rollback since the earlier review",
                           {"earlier": seen, "now": len(report.entries)}, name))
    else:
        out.append(control("C-4", NOT_APPLICABLE, "no earlier review of this node given (--since)", run=name))
    head = {"entries": len(report.entries), "head_hash": report.entries[-1]["hash"] if report.entries else None}
    return out, {"name": name, "head": head, "ledger": str(path / LEDGER)}


# ---- the review ----------------------------------------------------------------------------------
def review(target: Target, policy: Policy, policy_source: str, *, public_key: Path | None = None,
           since: dict[str, Any] | None = None, now: _dt.datetime | None = None,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The review's report (unsigned)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    witnessed = (since or {}).get("ledger_heads") if since is not None else None
    controls: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    facts: list[RunFacts] = []
    heads: dict[str, Any] = {}
    if target.kind == "node state":
        node, head = node_controls(target.path, policy, witnessed)
        controls += node
        heads[head["name"]] = head["head"]
    for run_dir in target.runs:
        if progress:
            progress(f"auditing {run_dir}")
        f = run_facts(run_dir, public_key)
        facts.append(f)
        controls += run_controls(f, policy, now, witnessed)
        heads[f.run_id or f.name] = {"entries": len(f.entries),
                                     "head_hash": f.entries[-1]["hash"] if f.entries else None}
        runs.append(run_record(f))
    if witnessed is not None:  # a run an earlier review saw, gone now
        present = set(heads)
        for run_id, seen in witnessed.items():
            if run_id not in present and target.kind == "server state":
                controls.append(control("C-4", FAIL, f"run {run_id}, which the earlier review saw with "
                                        f"{seen.get('entries')} entries, is gone", {"earlier": seen}, run_id))
    controls += deployment_controls(target, facts, policy, now, [])
    order = list(CONTROLS)
    controls.sort(key=lambda c: (order.index(c["id"]), c["run"] or ""))
    failed = [c for c in controls if c["status"] == FAIL]
    report = {
        "fedpriv_review": REVIEW_VERSION,
        "reviewed_at": now.isoformat(timespec="seconds"),
        "target": {"kind": target.kind, "path": str(target.path.resolve()),
                   "keys": str(target.keys.resolve()) if target.keys is not None else None},
        "policy": {"source": policy_source, **asdict(policy)},
        "verdict": PASS if not failed else FAIL,
        "failed_controls": sorted({c["id"] for c in failed}, key=order.index),
        "controls": controls,
        "runs": runs,
        "ledger_heads": heads,
        "since": changes(since, runs, controls, heads) if since is not None else None,
    }
    return report


def run_record(f: RunFacts) -> dict[str, Any]:
    """One run as the report lists it, with its privacy statement."""
    return {"name": f.name, "run_dir": str(f.run_dir.resolve()), "run_id": f.run_id,
            "audit_ok": f.audit["ok"], "statement": privacy_statement(f),
            "series": f.audit["series"], "budgets": f.audit["budgets"]}


def privacy_statement(f: RunFacts) -> dict[str, Any]:
    """What a model card needs: unit of privacy, epsilon and delta by both accountants, mechanism
    and trust model, rounds, sampling, the empirical lower bound if one was measured, the date.
    Every figure is the audit's (recomputed from the ledger)."""
    from fedpriv.common.audit import AUDIT_EMPIRICAL

    audit, config = f.audit, f.config
    record = audit["epsilon"]["record_level"]
    user = audit["epsilon"]["user_level"]
    worst = max(record.values(), key=lambda v: v["rdp"] if v["rdp"] is not None else math.inf) if record else None
    summary_privacy = (f.summary or {}).get("privacy") or {}
    empirical = None
    if (f.run_dir / AUDIT_EMPIRICAL).is_file():
        try:
            result = json.loads((f.run_dir / AUDIT_EMPIRICAL).read_text())
            empirical = {"epsilon_lower_bound": result.get("epsilon_lower_bound"), "confidence": result.get("confidence"),
                         "verdict": result.get("verdict")}
        except (OSError, ValueError):
            empirical = None
    rounds = {spend.round for spend in f.record_spends + f.state.user_level() if spend.round is not None}
    noise_mode = config.get("user_dp.noise_mode")
    end = f.entries[f.state.run_end.seq] if f.state.run_end is not None else None
    return {
        "run_id": f.run_id,
        "units": ([{"unit": "record", "meaning": "each training example of each client (DP-SGD on the node)"}]
                  if record else []) + ([{"unit": "user", "meaning": "the whole of one client's data (DP-FedAvg)"}]
                                        if user else []),
        "delta": audit["delta"],
        "record_level": None if worst is None else {
            "epsilon_rdp": worst["rdp"], "epsilon_pld": worst.get("pld"), "of": "the largest over clients",
            "clients": len(record), "mechanism": (summary_privacy.get("record_level") or {}).get("mechanism"),
            "noise_multiplier": config.get("dp.noise_multiplier"), "l2_norm_clip": config.get("dp.l2_norm_clip"),
            "sampling": "Poisson sampling of each batch on the node",
        },
        "user_level": None if user is None else {
            "epsilon_rdp": user["rdp"], "epsilon_pld": user.get("pld"),
            "epsilon_rdp_composed": (audit["user_level_cumulative"] or {}).get("rdp"),
            "mechanism": (summary_privacy.get("user_level") or {}).get("mechanism"),
            "noise_mode": noise_mode, "noise_multiplier": config.get("user_dp.noise_multiplier"),
            "clipping_norm": config.get("user_dp.clipping_norm"),
            "sampling": f"{config.get('federation.fraction_train')} of {config.get('federation.num_clients')} clients "
                        "per round",
        },
        "trust_model": ("no party is trusted with raw updates: " if config.get("secure_aggregation.enabled") else
                        "the server sees each update: ")
                       + ("noise added on each node (DP-SGD)" if record else "")
                       + ("; " if record and user else "")
                       + (("user-level noise shared among the nodes" if noise_mode == "distributed"
                           else "user-level noise added by the server, which is trusted to add it") if user else "")
                       + ("; updates masked with SecAgg+" if config.get("secure_aggregation.enabled") else ""),
        "rounds": len(rounds),
        "accountants": {"rdp": "dp-accounting's RDP accountant (enforced)", "pld": "dp-accounting's PLD accountant"},
        "empirical": empirical,
        "run_ended": end.get("time") if end else None,
        "ledger_entries": audit["entries"],
        "audit_ok": audit["ok"],
    }


def changes(since: dict[str, Any], runs: list[dict[str, Any]], controls: list[dict[str, Any]],
            heads: dict[str, Any]) -> dict[str, Any]:
    """What changed since an earlier review: new and removed runs, epsilon spent since, controls
    whose state changed."""
    before_runs = {r["run_id"]: r for r in since.get("runs", [])}
    now_runs = {r["run_id"]: r for r in runs}
    spent = {}
    for run_id, run in now_runs.items():
        old = before_runs.get(run_id)
        if old is None:
            continue
        entry = {}
        for level in ("record_level", "user_level"):
            new_eps = ((run["statement"].get(level)) or {}).get("epsilon_rdp")
            old_eps = ((old["statement"].get(level)) or {}).get("epsilon_rdp")
            if new_eps is not None and old_eps is not None and new_eps != old_eps:
                entry[level] = {"before": old_eps, "now": new_eps, "spent_since": new_eps - old_eps}
        if entry:
            spent[run_id] = entry
    before = {(c["id"], c["run"]): c["status"] for c in since.get("controls", [])}
    changed = [{"id": c["id"], "run": c["run"], "before": before[(c["id"], c["run"])], "now": c["status"]}
               for c in controls if (c["id"], c["run"]) in before and before[(c["id"], c["run"])] != c["status"]]
    return {
        "earlier_review": since.get("reviewed_at"),
        "new_runs": sorted(set(now_runs) - set(before_runs), key=str),
        "removed_runs": sorted(set(before_runs) - set(now_runs), key=str),
        "epsilon_spent_since": spent,
        "controls_changed": changed,
        "ledger_heads_before": since.get("ledger_heads"),
    }


def default_out(target: Target, now: _dt.datetime) -> Path:
    return target.path / REVIEWS_DIR / now.strftime("%Y%m%dT%H%M%SZ")


def signing_key_path(target: Target) -> Path:
    """The federation's key that signs the review: the deployment's ledger-signing key, the
    simulations' ($FEDPRIV_LEDGER_KEY or $FEDPRIV_HOME/keys), or a node's own key."""
    if target.kind == "node state":
        return target.path / rundir.NODE_KEY
    if target.keys is not None and (target.keys / rundir.LEDGER_SIGNING_KEY).is_file():
        return target.keys / rundir.LEDGER_SIGNING_KEY
    return rundir.ledger_signing_key_path()



# ---- the signed report ---------------------------------------------------------------------------
SIGNATURE_ALGORITHM = "Ed25519 over SHA-256 of the canonical JSON of every other field"


def sign_report(report: dict[str, Any], key: Any) -> bytes:
    """The report as signed bytes: canonical JSON (sorted keys, no spaces) with a ``signature``
    field, so that any altered byte either breaks the canonical form or the signature."""
    import base64
    import hashlib

    from fedpriv.common.ledger import canonical, key_id

    body = {k: v for k, v in report.items() if k != "signature"}
    digest = hashlib.sha256(canonical(body)).digest()
    signature = {"algorithm": SIGNATURE_ALGORITHM, "key_id": key_id(key.public_key()),
                 "value": base64.b64encode(key.sign(digest)).decode()}
    return canonical({**body, "signature": signature}) + b"\n"


def verify_report(data: bytes, public_key: Any, where: str = "review") -> dict[str, Any]:
    """The report in ``data`` if it is exactly what :func:`sign_report` wrote, signed by
    ``public_key``; otherwise one :class:`FedprivError` line saying why."""
    import base64
    import hashlib

    from cryptography.exceptions import InvalidSignature

    from fedpriv.common.ledger import key_id

    try:
        report = json.loads(data)
        if not isinstance(report, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise FedprivError(f"{where} does not verify: it is not a JSON report (altered or truncated)") from None
    signature = report.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        raise FedprivError(f"{where} does not verify: it carries no signature")
    if set(signature) != {"algorithm", "key_id", "value"} or signature["algorithm"] != SIGNATURE_ALGORITHM:
        raise FedprivError(f"{where} does not verify: its signature is not of the form fedpriv signs (altered)")
    # (JSON as parsed holds no non-finite float to make safe: canonical's dumps, without its walk)
    try:
        canonical_text = json.dumps(report, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        canonical_text = b""
    if data != canonical_text + b"\n":
        raise FedprivError(f"{where} does not verify: its bytes are not the canonical form it was signed in (altered)")
    if signature.get("key_id") != key_id(public_key):
        raise FedprivError(f"{where} does not verify: it names signing key {signature.get('key_id')}, not the "
                           f"given key {key_id(public_key)}")
    body = {k: v for k, v in report.items() if k != "signature"}
    try:
        raw = base64.b64decode(signature["value"], validate=True)
        if base64.b64encode(raw).decode() != signature["value"]:  # base64's unused bits are not free
            raise ValueError("not canonical base64")
        public_key.verify(raw, hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest())
    except (InvalidSignature, ValueError):
        raise FedprivError(f"{where} does not verify: the signature does not match its contents (altered)") from None
    return report
