"""The empirical privacy audit of a run (``fedpriv audit RUN_DIR --empirical``).

One-run auditing (Steinke, Nasr and Jagielski 2023) needs canaries in the training data, so the
audit trains the run's own configuration, read from its verified ledger, once more in a scratch
run directory, with :mod:`common.canaries` added to the simulated clients' data. It then scores
every canary by its loss under the final model, turns the scores into the one-run lower bound on
epsilon (:mod:`common.empirical`), and sets it beside the accounted upper bound. The original
run directory is only read.

The upper bound the verdict uses is the canary run's own accounting: that is the run whose
privacy was measured (its clients hold the canaries too, so their sampling rates, and epsilon,
differ a little from the original run's; with ``--rounds`` the difference is larger). Each
client's tightest accounted figure (the smaller of RDP and PLD) is a valid claim for the canaries
it holds; the largest over clients covers them all. The original run's epsilon is reported
beside it.

The audit re-runs the implementation installed here on the run's configuration: it tests the code
and the configuration, not the model the run produced. For runs of a real federation, whose nodes
trained on their own files, it simulates the configured dataset's partitions instead.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedpriv.clients.app import local_data
from fedpriv.common import accounting, checkpoint, empirical, rundir
from fedpriv.common.checkpoint import CheckpointError
from fedpriv.common.audit import audited_run
from fedpriv.common.canaries import DEFAULT_COUNT as DEFAULT_CANARIES
from fedpriv.common.canaries import (
    CLIENT_DEFAULT_COUNT, CLIENT_DESIGN, DESIGN, GRADIENT_DEFAULT_COUNT, GRADIENT_DESIGN, CanaryClients, Canaries,
    GradientCanaries,
)
from fedpriv.common.config import RunConfig
from fedpriv.common.data import load_dataset
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import load_public_key, verify_ledger
from fedpriv.common.models import configured_model
from fedpriv.common.replay import LedgerState, replay
from fedpriv.common.settings import recorded_config
from fedpriv.server.run_log import RoundEntry

MAX_CANARIES = 1_000_000


def audit_config(run_dir: Path, public_key: Path | None, rounds: int | None,
                 work_dir: Path) -> tuple[RunConfig, RunConfig]:
    """The configuration the run last ran with (from its verified ledger), and the same
    retargeted at the scratch directory: a fresh run (no resume) whose nodes keep their state
    there too, never in the run's own or a shared ``client.state_dir``."""
    verified = verify_ledger(run_dir, load_public_key(public_key) if public_key else None)
    if not verified.ok:
        raise FedprivError(f"cannot audit {run_dir} empirically: its ledger does not verify "
                           f"({verified.failures[0]})")
    recorded = RunConfig.from_flat(recorded_config(verified.entries))
    run = dataclasses.replace(recorded.run, name=f"{recorded.run.name}-empirical",
                              out_dir=str(work_dir.resolve()), resume=False, rounds=rounds or recorded.run.rounds)
    cfg = dataclasses.replace(recorded, run=run, client=dataclasses.replace(recorded.client, state_dir=""))
    cfg.validate()
    return recorded, cfg


def accounted(report: dict[str, Any]) -> dict[str, Any] | None:
    """The largest record-level epsilon over clients, by RDP and PLD, and the tightest claim
    (per client the smaller of the two, then the largest over clients); None without DP-SGD."""
    clients = report["epsilon"]["record_level"]
    if not clients:
        return None

    def largest(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    tightest = [min(v for v in (f["rdp"], f["pld"]) if v is not None) for f in clients.values()
                if f["rdp"] is not None or f["pld"] is not None]
    return {
        "rdp": largest([f["rdp"] for f in clients.values()]),
        "pld": largest([f["pld"] for f in clients.values()]),
        "tightest": max(tightest) if tightest else None,
    }


PROFILE_POINTS = 400  # epsilons at which the accountant's profile is read (the claim's trade-off curve)


def accounted_claim(state: LedgerState, accounted_epsilon: float, level: str = "record") -> Any:
    """The ``level`` ("record" or "user") claim of a replayed, verified ledger as a trade-off
    function (``f(1 - x)``, :func:`common.empirical.profile_tradeoff`): delta(epsilon) by the PLD
    accountant on a grid up to four times ``accounted_epsilon``; at record level each client's,
    the largest over clients (a claim that covers every client's canaries). None without spends."""
    grid = np.linspace(0.0, max(4.0 * accounted_epsilon, 1.0), PROFILE_POINTS)
    if level == "user":
        spends = state.user_level()
        actors = [([s.event for s in spends], spends[0].sampling)] if spends else []
    else:
        actors = [(actor.events, actor.sampling) for actor in state.clients().values()]
    profiles = {}
    for events, sampling in actors:
        key = (repr(events), sampling)
        if key not in profiles:
            profiles[key] = accounting.privacy_profile(events, grid, sampling)
    if not profiles:
        return None
    worst = np.max(np.stack(list(profiles.values())), axis=0)
    return empirical.profile_tradeoff(grid, worst)


def _losses(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from fedpriv.common.tf_runtime import keras

    loss = keras().losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    out = []
    for start in range(0, len(y), 2048):
        logits = model(x[start:start + 2048], training=False)
        out.append(np.asarray(loss(y[start:start + 2048], logits)))
    return np.concatenate(out) if out else np.zeros(0)


def _load_model(cfg: RunConfig, path: Path, run_id: str | None) -> Any | None:
    """The sealed final model of run ``run_id`` in ``path``, or None if it is absent, cannot be
    unsealed with the configured key, or does not fit ``cfg``."""
    if not path.is_file():
        return None
    try:
        return configured_model(cfg, checkpoint.read_model(path, checkpoint.require_key("the sealed model"), run_id))
    except (ValueError, CheckpointError):
        return None


def _training_data(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    parts = [local_data(cfg, pid) for pid in range(cfg.federation.num_clients)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_options(canaries: int | None = None, confidence: float = empirical.DEFAULT_CONFIDENCE,
                  rounds: int | None = None, seed: int | None = None, work_dir: Path | None = None) -> None:
    """Refuse bad options with one line, before anything is trained."""
    if canaries is not None and not 2 <= canaries <= MAX_CANARIES:
        raise FedprivError(f"--canaries must be between 2 and {MAX_CANARIES:,}, got {canaries}")
    if not 0 < confidence < 1:
        raise FedprivError(f"--confidence must be between 0 and 1 (exclusive), got {confidence}")
    if rounds is not None and rounds < 1:
        raise FedprivError(f"--rounds must be at least 1, got {rounds}")
    if seed is not None and seed < 0:
        raise FedprivError(f"--seed must be a non-negative integer, got {seed}")
    if work_dir is not None and work_dir.exists() and (not work_dir.is_dir() or any(work_dir.iterdir())):
        raise FedprivError(f"--work-dir {work_dir} already exists and is not an empty directory")


def run_empirical_audit(
    run_dir: Path,
    run_report: dict[str, Any],
    *,
    canaries: int | None = None,
    confidence: float = empirical.DEFAULT_CONFIDENCE,
    rounds: int | None = None,
    seed: int | None = None,
    work_dir: Path | None = None,
    public_key: Path | None = None,
    verbose: bool = False,
    on_round: Callable[[RoundEntry], None] | None = None,
    white_box: bool = False,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train the run's configuration with canaries once, measure, and compare (see the module
    docstring). ``run_report`` is :func:`common.audit.audit_run`'s report of ``run_dir``;
    ``work_dir`` keeps the canary run (default: a temporary directory, removed afterwards);
    ``on_start`` is called once the configuration has passed every check, before training."""
    check_options(canaries, confidence, rounds, seed, work_dir)
    if canaries is None:
        canaries = GRADIENT_DEFAULT_COUNT if white_box else DEFAULT_CANARIES
    keep = work_dir is not None
    scratch = work_dir or Path(tempfile.mkdtemp(prefix="fedpriv-empirical-"))
    try:
        return _audit(run_dir, run_report, scratch, keep, canaries, confidence, rounds, seed,
                      public_key, verbose, on_round, white_box, on_start)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _audit(run_dir: Path, run_report: dict[str, Any], scratch: Path, keep: bool, count: int,
           confidence: float, rounds: int | None, seed: int | None, public_key: Path | None,
           verbose: bool, on_round: Callable[[RoundEntry], None] | None, white_box: bool,
           on_start: Callable[[], None] | None) -> dict[str, Any]:
    from fedpriv.simulations.run import plan, simulate

    started = time.perf_counter()
    recorded, cfg = audit_config(run_dir, public_key, rounds, scratch)
    seed = secrets.randbits(63) if seed is None else seed
    canary_set: Canaries | GradientCanaries
    if white_box:
        _check_white_box(cfg, count)
        canary_set = GradientCanaries(seed=seed, count=count, sink=str(scratch / "white-box"))
    else:
        canary_set = Canaries(seed=seed, count=count)
    clients = (CanaryClients(seed=seed, count=CLIENT_DEFAULT_COUNT, sink=str(scratch / "canary-clients"))
               if cfg.user_dp.enabled and cfg.user_dp.noise_mode == "central" else None)
    run_plan = plan(cfg)
    if on_start is not None:
        on_start()
    training_started = time.perf_counter()
    summary = simulate(cfg, scratch, verbose=verbose, on_round=on_round, run_plan=run_plan,
                       canaries=canary_set, canary_clients=clients)
    training_s = time.perf_counter() - training_started
    canary_report, canary_entries = audited_run(scratch)  # (the canary run's ledger: read once)
    canary_state = replay(canary_entries)
    if not canary_report["ledger_ok"]:
        raise FedprivError(f"the canary run's own ledger does not verify: {canary_report['failures'][0]}")

    model = _load_model(cfg, scratch / rundir.MODEL, canary_report["run_id"])
    if model is None:
        raise FedprivError(f"the canary run left no usable model in {scratch / rundir.MODEL}")
    included = canary_set.included()
    if isinstance(canary_set, GradientCanaries):
        from fedpriv.clients.whitebox import collect

        scores, observations = collect(canary_set)
        if observations == 0:
            raise FedprivError("the canary run's clients recorded no white-box observation")
    else:
        x_canary, y_canary = canary_set.records(cfg.data, cfg.run.seed)
        scores, observations = -np.nan_to_num(_losses(model, x_canary, y_canary), nan=np.inf), None
    delta = cfg.privacy.delta
    canary_eps = accounted(canary_report)
    claim = accounted_claim(canary_state, canary_eps["tightest"]) if canary_eps and canary_eps["tightest"] else None
    bound = empirical.one_run_audit(scores, included, delta, confidence, claim=claim)

    dataset = load_dataset(cfg.data, cfg.run.seed)
    x_train, y_train = _training_data(cfg)
    attacks = {"canary_run_model": empirical.membership_inference(
        _losses(model, x_train, y_train), _losses(model, dataset.x_test, dataset.y_test))}
    run_model = _load_model(cfg, run_dir / rundir.MODEL, run_report.get("run_id"))
    if run_model is not None:
        attacks["run_model"] = empirical.membership_inference(
            _losses(run_model, x_train, y_train), _losses(run_model, dataset.x_test, dataset.y_test))
    primary = attacks.get("run_model", attacks["canary_run_model"])

    run_eps = accounted(run_report)
    upper = canary_eps["tightest"] if canary_eps else None
    lower = bound["epsilon_lower_bound"]
    consistent = holds(bound, upper)
    user_level = None
    if clients is not None:
        user_level = _canary_clients(clients, model, canary_state, canary_report, delta, confidence)
        consistent = consistent and user_level["consistent"]
    notes = []
    if upper is None:
        notes.append("the run has no record-level DP (no DP-SGD), so there is no accounted bound to "
                     "violate: consistent trivially; the lower bound measures the leakage")
    if run_report["epsilon"]["user_level"] is not None and user_level is None:
        notes.append("record-level canaries do not test the user-level (DP-FedAvg) claim; canary "
                     "clients need central user-level noise (this run's is distributed)")
    if cfg.run.rounds != recorded.run.rounds:
        notes.append(f"trained {cfg.run.rounds} rounds (--rounds), not the run's {recorded.run.rounds}: "
                     f"the run's accounted epsilon is not comparable, the canary run's is")
    if white_box:
        notes.append("white-box: every step's released gradient observed at each canary's parameter "
                     "(the adversary record-level DP-SGD protects against); scores are log-likelihood ratios")
    return {
        "mode": "white-box" if white_box else "black-box",
        "epsilon_lower_bound": lower,
        "gdp_epsilon_lower_bound": bound["gdp_epsilon_lower_bound"],
        "gdp_guesses": bound["gdp_guesses"],
        "gdp_correct": bound["gdp_correct"],
        "claim_rejected": bound["claim_rejected"],
        "observations": observations,
        "user_level": user_level,
        "confidence": confidence,
        "delta": delta,
        "canaries": count,
        "canaries_included": bound["included"],
        "guesses": bound["guesses"],
        "correct": bound["correct"],
        "guesses_in": bound["guesses_in"],
        "guesses_out": bound["guesses_out"],
        "guess_plans_tried": bound["plans_tried"],
        "accounted_epsilon": upper,
        "accounted": {"canary_run": canary_eps, "run": run_eps},
        "consistent": consistent,
        "verdict": empirical.VERDICT_CONSISTENT if consistent else empirical.VERDICT_VIOLATION,
        "auc": primary["auc"],
        "tpr_at_fpr": primary["tpr_at_fpr"],
        "membership_inference": attacks,
        "canary_design": GRADIENT_DESIGN if white_box else DESIGN,
        "canary_seed": seed,
        "rounds": cfg.run.rounds,
        "num_clients": cfg.federation.num_clients,
        "canary_run_final_accuracy": summary.get("final_accuracy"),
        "training_s": training_s,
        "wall_time_s": time.perf_counter() - started,
        "work_dir": str(scratch) if keep else None,
        "notes": notes,
    }


def holds(bound: dict[str, Any], upper: float | None) -> bool:
    """Whether an accounted claim (epsilon ``upper``; None: no claim) survives the one-run audit
    ``bound``: neither Steinke et al.'s bound above it nor its profile rejected."""
    return upper is None or not (bound["epsilon_lower_bound"] > upper or bound["claim_rejected"])


def _canary_clients(clients: CanaryClients, model: Any, canary_state: LedgerState, canary_report: dict[str, Any],
                    delta: float, confidence: float) -> dict[str, Any]:
    """Score the canary clients by their cosine with the model's change over the canary run, and
    set the estimate, the one-run bounds and the test of the accountant's user-level profile
    beside the accounted user-level epsilon."""
    initial = np.load(Path(clients.sink) / "initial.npy")
    final = np.concatenate([np.asarray(w, np.float64).ravel() for w in model.get_weights()])
    cosines = clients.cosines(final - initial)
    included = clients.included()
    figures = canary_report["epsilon"]["user_level"] or {}
    known = [v for v in (figures.get("rdp"), figures.get("pld")) if v is not None]
    upper = min(known) if known else None
    claim = accounted_claim(canary_state, upper, "user") if upper is not None and np.isfinite(upper) else None
    bound = empirical.one_run_audit(cosines, included, delta, confidence, claim=claim)
    estimate = empirical.gaussian_estimate(cosines[included], cosines[~included], delta)
    consistent = holds(bound, upper)
    return {
        "canary_clients": clients.count,
        "included": int(included.sum()),
        "design": CLIENT_DESIGN,
        "estimate": estimate["epsilon"],
        "mu": estimate["mu"],
        "mean_cosine_in": float(cosines[included].mean()),
        "mean_cosine_out": float(cosines[~included].mean()),
        "epsilon_lower_bound": bound["epsilon_lower_bound"],
        "gdp_epsilon_lower_bound": bound["gdp_epsilon_lower_bound"],
        "claim_rejected": bound["claim_rejected"],
        "accounted_epsilon": upper,
        "consistent": consistent,
    }


def _check_white_box(cfg: RunConfig, count: int) -> None:
    """Refuse a white-box audit the run's configuration cannot have, with one line."""
    from fedpriv.clients.trainer import choose_implementation
    from fedpriv.common.models import build_layers, resolve_model_name

    if not cfg.dp.enabled:
        raise FedprivError("--white-box audits DP-SGD's clipping and noise, and this run has no DP-SGD "
                           "(dp.enabled = false); use the black-box audit")
    dataset = load_dataset(cfg.data, cfg.run.seed)
    name = resolve_model_name(cfg.model, dataset.input_shape)
    layers = build_layers(name, cfg.model, dataset.input_shape, dataset.num_classes)
    implementation = choose_implementation(cfg.dp, layers)
    if implementation != "bookkeeping":
        raise FedprivError(f"--white-box needs book-keeping DP-SGD (dp.implementation auto or bookkeeping); "
                           f"this run uses {implementation!r}")
    from fedpriv.common.tf_runtime import keras

    parameters = sum(int(np.prod(w.shape)) for w in keras().Sequential(layers).trainable_weights)
    if count > parameters:
        raise FedprivError(f"--canaries {count:,} exceeds the model's {parameters:,} parameters "
                           f"(one gradient canary per parameter)")


def verdict_line(result: dict[str, Any]) -> str:
    """One line: the verdict, the measured lower bounds and the accounted upper bound."""
    upper = result["accounted_epsilon"]
    claim = "no record-level claim" if upper is None else f"accounted epsilon {upper:.3f}"
    gdp = result.get("gdp_epsilon_lower_bound")
    fdp = "" if gdp is None else f" (f-DP: {gdp:.3f})"
    rejected = "; the accountant's trade-off curve is rejected" if result.get("claim_rejected") else ""
    user = result.get("user_level")
    if user and not user["consistent"]:
        rejected += (f"; canary clients: user-level lower bound {user['gdp_epsilon_lower_bound']:.3f} (f-DP), "
                     f"estimate {user['estimate']:.3f} vs accounted {user['accounted_epsilon']:.3f}")
    return (f"{result['verdict']}: lower bound {result['epsilon_lower_bound']:.3f}{fdp} at "
            f"{result['confidence'] * 100:g}% confidence vs {claim}{rejected}")

