"""The cost and the findings of the empirical privacy audit on the demo federation.

For each preset (default: quickstart, then no-dp) this runs ``fedpriv simulate`` and then
``fedpriv audit RUN --empirical`` on the run it wrote, one after the other on the same machine,
both as a user would (a fresh process each, start-up included), and reports the wall-time ratio
audit / run (target: at most 2x), the measured lower bound on epsilon beside the accounted one,
the verdict, and the membership-inference AUC. Results go to benchmarks/results/empirical_audit.*.

    uv run python benchmarks/empirical_audit.py [--set key=value ...] [--preset P ...] [--check]
        [--white-box] [--canaries M]

With ``--white-box`` the audits are white-box (gradient canaries, every step observed; DP presets
only, default quickstart, 10,000 canaries) and the results go to empirical_audit_whitebox.*.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dp_vs_nodp import RESULTS, machine, simulate  # noqa: E402

PRESETS = ("quickstart", "no-dp")
TARGET_RATIO = 2.0
SEED = 20261128  # of the canaries; training itself draws from the OS


def audit(run_dir: Path, canaries: int, white_box: bool = False) -> tuple[dict, float]:
    """``fedpriv audit RUN_DIR --empirical --json``: its report and wall time. Exits on bad input."""
    args = [sys.executable, "-m", "fedpriv", "audit", str(run_dir), "--empirical", "--json",
            "--seed", str(SEED), "--canaries", str(canaries), *(["--white-box"] if white_box else [])]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        sys.exit(f"error: audit of {run_dir} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout), wall


def measure(preset: str, overrides: list[str], canaries: int, root: Path, white_box: bool = False) -> dict:
    summary = simulate(preset, overrides, root / preset)
    report, audit_wall = audit(root / preset, canaries, white_box)
    result = report["empirical"]
    attack = result["membership_inference"]
    return {
        "preset": preset,
        "clients": summary["config"]["federation"]["num_clients"],
        "rounds": summary["config"]["run"]["rounds"],
        "final_accuracy": summary["final_accuracy"],
        "run_wall_s": summary["_wall_s"],
        "audit_wall_s": audit_wall,
        "audit_training_s": result["training_s"],
        "ratio": audit_wall / summary["_wall_s"],
        "accounted_epsilon_run_rdp": (result["accounted"]["run"] or {}).get("rdp"),
        "accounted_epsilon": result["accounted_epsilon"],
        "epsilon_lower_bound": result["epsilon_lower_bound"],
        "gdp_epsilon_lower_bound": result.get("gdp_epsilon_lower_bound"),
        "claim_rejected": result.get("claim_rejected"),
        "confidence": result["confidence"],
        "delta": result["delta"],
        "canaries": result["canaries"],
        "guesses": result["guesses"],
        "correct": result["correct"],
        "verdict": result["verdict"],
        "auc_run_model": attack.get("run_model", {}).get("auc"),
        "tpr_at_fpr_1pct_run_model": attack.get("run_model", {}).get("tpr_at_fpr", {}).get("0.01"),
        "auc_canary_run_model": attack["canary_run_model"]["auc"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | rounds | accuracy | run (s) | audit (s) | audit / run | accounted epsilon | "
        "lower bound (95%) | f-DP lower bound | correct / guesses | verdict | MI AUC | TPR at FPR 1% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]

    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['rounds']} | {fmt(r['final_accuracy'], '.4f')} | {r['run_wall_s']:.1f} | "
            f"{r['audit_wall_s']:.1f} | {r['ratio']:.2f} | {fmt(r['accounted_epsilon'])} | "
            f"{r['epsilon_lower_bound']:.2f} | {fmt(r.get('gdp_epsilon_lower_bound'))} | "
            f"{r['correct']} / {r['guesses']} | {r['verdict']} | "
            f"{fmt(r['auc_run_model'], '.3f')} | {fmt(r['tpr_at_fpr_1pct_run_model'], '.3f')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every run")
    parser.add_argument("--preset", dest="presets", action="append", help=f"default: {', '.join(PRESETS)}")
    parser.add_argument("--canaries", type=int, help="default 1000, or 10000 with --white-box")
    parser.add_argument("--white-box", action="store_true", help="white-box audits (DP presets only)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the cost target is missed")
    args = parser.parse_args()

    canaries = args.canaries or (10_000 if args.white_box else 1000)
    presets = args.presets or (["quickstart"] if args.white_box else list(PRESETS))
    name = "empirical_audit_whitebox" if args.white_box else "empirical_audit"
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-audit-") as tmp:
        rows = [measure(p, args.overrides, canaries, Path(tmp), args.white_box) for p in presets]
    worst = max(r["ratio"] for r in rows)
    met = worst <= TARGET_RATIO
    verdict = (f"largest wall-time ratio audit / run {worst:.2f}: target (<= {TARGET_RATIO:g}x) "
               f"{'met' if met else 'MISSED'}")
    report = f"{table(rows)}\n\n{verdict}\n"
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "largest_ratio": worst, "target_ratio": TARGET_RATIO, "target_met": met,
               "overrides": args.overrides, "canary_seed": SEED, "white_box": args.white_box, "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    mode = " --white-box" if args.white_box else ""
    (RESULTS / f"{name}.md").write_text(
        f"# The empirical privacy audit{mode}: cost and findings\n\n"
        f"Each run (`fedpriv simulate --preset P`), then its audit (`fedpriv audit RUN --empirical{mode}`, "
        f"{canaries} canaries, canary seed {SEED}), one after the other on "
        f"{payload['machine']['cpus']} CPUs ({payload['machine']['platform']}); wall times include "
        f"process start-up. Settings: {' '.join(args.overrides) or 'the presets as they are'}.\n\n"
        f"{report}"
    )
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
