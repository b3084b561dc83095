"""Write a run's results: summary.json, metrics.csv, the progress plot and the final model (sealed)."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.common import checkpoint, fileio, ledger, rundir, user_dp
from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT
from fedpriv.common.config import RunConfig
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.run_log import RunLog

# One row per round: the server's evaluation on its own test data (accuracy, loss), the
# accounted epsilons, the user-level clip (moved by adaptive clipping from noised counts only),
# client counts the server knows itself, wall time. No client statistic.
CSV_COLUMNS = (
    "round", "accuracy", "loss", "record_epsilon_max", "user_epsilon", "clipping_norm", "clients_trained",
    "clients_failed", "seconds",
)

log = logging.getLogger("fedpriv")

USER_MECHANISM = user_dp.SUMMARIES  # one text per user-level noise mode (common/user_dp.py)


def build_summary(config: RunConfig, run_log: RunLog, extra: dict[str, Any],
                  figures: dict[str, Any], recorder: PrivacyRecorder) -> dict[str, Any]:
    rounds = [asdict(run_log.rounds[r]) for r in sorted(run_log.rounds)]
    final_accuracy = next((r["accuracy"] for r in reversed(rounds) if r["accuracy"] is not None), None)
    record = figures["record_level"]
    user = figures["user_level"]
    privacy: dict[str, Any] = {
        "delta": config.privacy.delta,
        "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
        "ledger": ledger.LEDGER,
        # The signing key's fingerprint and its public half outside the run directory, to pin
        # in an audit (fedpriv audit --public-key), and the server's witness of the ledger.
        "ledger_key": {"fingerprint": recorder.key_id, "public_key": str(recorder.public_key_path.resolve()),
                       "witness": str(recorder.witness_root.resolve())},
        "refusals": recorder.refusals,
        "failed_rounds": recorder.failed_rounds,
        "stopped_early": recorder.stopped,
        "user_level": {
            "enabled": config.user_dp.enabled,
            "epsilon": user["rdp"] if user else None,
            "epsilon_pld": user["pld"] if user else None,
            # composed with the user-level spending of the earlier runs of this server state (one
            # population, common/population.py); the budget is enforced on it
            "cumulative_epsilon": (figures.get("user_level_cumulative") or {}).get("rdp") if user else None,
            "cumulative_epsilon_pld": (figures.get("user_level_cumulative") or {}).get("pld") if user else None,
            "composed_runs": figures.get("composed_runs", []),
            "uncomposed_runs": figures.get("uncomposed_runs", []),
            # distributed mode: the sum of discrete Gaussians approximated by a continuous Gaussian
            # with Poisson amplification -- not a bound, printed for comparison only
            "epsilon_gaussian_approximation": figures.get("user_level_gaussian_approximation"),
            "budget": config.privacy.user_budget or None,
            "noise_mode": config.user_dp.noise_mode if config.user_dp.enabled else None,
            "mechanism": USER_MECHANISM[config.user_dp.noise_mode] if config.user_dp.enabled
            else "none (no user-level DP)",
            "noise_multiplier": config.user_dp.noise_multiplier if config.user_dp.enabled else None,
            "clipping_norm": config.user_dp.clipping_norm if config.user_dp.enabled else None,
        },
        "record_level": {
            "enabled": config.dp.enabled,
            "max_epsilon": max((v["rdp"] for v in record.values()), default=None) if config.dp.enabled else None,
            "clients": {cid: v["rdp"] for cid, v in record.items()},
            "clients_pld": {cid: v["pld"] for cid, v in record.items()},
            "budget": config.privacy.record_budget or None,
            "accountant": ENFORCEMENT_ACCOUNTANT,
            "mechanism": (
                "DP-SGD, Poisson-sampled Gaussian per step (dp-accounting), composed over every "
                "step each client took"
            ) if config.dp.enabled else "none (no record-level DP)",
            "l2_norm_clip": config.dp.l2_norm_clip if config.dp.enabled else None,
            "noise_multiplier": config.dp.noise_multiplier if config.dp.enabled else None,
        },
    }
    return {
        "fedpriv_summary_version": 1,
        "name": config.run.name,
        "final_accuracy": final_accuracy,
        "initial_accuracy": run_log.initial_accuracy,
        "initial_loss": run_log.initial_loss,
        "rounds": rounds,
        "privacy": privacy,
        "failures": run_log.failures,
        **extra,
        "config": config.to_dict(),
    }


def metrics_csv(run_log: RunLog) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(run_log.rounds):
        row = asdict(run_log.rounds[r])
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def plot_progress(run_log: RunLog, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(run_log.rounds)
    acc = [run_log.rounds[r].accuracy for r in rounds]
    eps = [run_log.rounds[r].record_epsilon_max for r in rounds]
    user_eps = [run_log.rounds[r].user_epsilon for r in rounds]
    clips = [run_log.rounds[r].clipping_norm for r in rounds]
    if len({c for c in clips if c is not None}) > 1:  # adaptive clipping: the clip gets its own panel
        fig, (ax_acc, ax_clip) = plt.subplots(2, 1, figsize=(7, 5.6), dpi=110, sharex=True,
                                              gridspec_kw={"height_ratios": [3, 1]})
        ax_clip.plot(rounds, [np.nan if c is None else c for c in clips], "d-", color="tab:green")
        ax_clip.set_ylabel("user-level clip")
        ax_clip.set_xlabel("round")
        ax_clip.grid(alpha=0.3)
    else:
        fig, ax_acc = plt.subplots(figsize=(7, 4), dpi=110)
    ax_acc.plot(rounds, [np.nan if a is None else a for a in acc], "o-", color="tab:blue", label="test accuracy")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy", color="tab:blue")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    if any(e is not None for e in eps + user_eps):
        ax_eps = ax_acc.twinx()
        if any(e is not None for e in eps):
            ax_eps.plot(rounds, [np.nan if e is None else e for e in eps], "s--", color="tab:red",
                        label="record-level epsilon (max over clients)")
        if any(e is not None for e in user_eps):
            ax_eps.plot(rounds, [np.nan if e is None else e for e in user_eps], "^:", color="tab:purple",
                        label="user-level epsilon")
            ax_eps.legend(loc="lower right", fontsize=8)
        ax_eps.set_ylabel("epsilon", color="tab:red")
        ax_eps.set_ylim(bottom=0)
    ax_acc.set_title(title)
    if rounds:
        ax_acc.set_xticks(rounds)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    fileio.write_atomic(path, buffer.getvalue())


def write_run(out_dir: Path, config: RunConfig, run_log: RunLog, weights: list[np.ndarray],
              extra: dict[str, Any], figures: dict[str, Any], recorder: PrivacyRecorder,
              sealing_key: bytes | None) -> dict[str, Any]:
    """The run's files. The final model is sealed with ``sealing_key`` and bound to the run
    (``fedpriv model export`` writes a plaintext copy on purpose); with no key the model is not
    written at all, and the summary says so."""
    fileio.private_dir(out_dir)
    model_file = rundir.MODEL if sealing_key is not None else None
    summary = build_summary(config, run_log, {**extra, "run_id": recorder.run_id, "model_file": model_file},
                            figures, recorder)
    fileio.write_json(out_dir / rundir.SUMMARY, summary)
    fileio.write_atomic(out_dir / rundir.METRICS, metrics_csv(run_log).encode())
    if sealing_key is not None:
        checkpoint.write_sealed(out_dir / rundir.MODEL, weights, {"run": config.run.name}, sealing_key,
                                role=checkpoint.ROLE_MODEL, run_id=recorder.run_id)
    else:
        log.warning("fedpriv: no sealing key ($%s or $%s): the final model is not written (it is never "
                    "stored in plaintext)", checkpoint.KEY_ENV, checkpoint.KEY_FILE_ENV)
    plot_progress(run_log, out_dir / rundir.PLOT, f"{config.run.name}: accuracy and privacy per round")
    return summary
