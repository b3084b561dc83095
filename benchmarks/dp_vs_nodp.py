"""Run `quickstart` (DP-SGD) and `no-dp` side by side on the same data and seed.

Prints a Markdown table of final accuracy, record-level epsilon and wall time, and saves it with
the machine, versions and seed under benchmarks/results/. Target on the built-in data: the DP run
is within 10 percentage points of the no-DP run's accuracy at record-level epsilon <= 8
(delta = 1e-5).

    uv run python benchmarks/dp_vs_nodp.py [--set key=value ...] [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRESETS = ("quickstart", "no-dp")
TARGET_GAP_PP = 10.0
TARGET_EPSILON = 8.0


def simulate(preset: str, overrides: list[str], out: Path, runner: list[str] | None = None) -> dict:
    """Run ``fedpriv simulate`` as a user would; return its summary, with the wall time
    (start-up included) as ``_wall_s``. Exits on a failed run. ``runner``: what runs the
    ``fedpriv`` command line after the interpreter (default ``-m fedpriv``; secagg.py passes its
    exchange timer)."""
    args = [sys.executable, *(runner or ["-m", "fedpriv"]), "simulate", "--preset", preset, "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: run {preset} {overrides} failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["_wall_s"] = wall
    return summary


def run_preset(preset: str, overrides: list[str], out: Path) -> dict:
    summary = simulate(preset, overrides, out)
    return {
        "preset": preset,
        "final_accuracy": summary["final_accuracy"],
        "record_epsilon": summary["privacy"]["record_level"]["max_epsilon"],
        "delta": summary["privacy"]["delta"],
        "wall_time_s": summary["_wall_s"],
        "seed": summary["config"]["run"]["seed"],
        "clients": summary["config"]["federation"]["num_clients"],
        "rounds": summary["config"]["run"]["rounds"],
    }


def machine() -> dict:
    versions = {}
    for package in ("flwr", "tensorflow", "tf-keras", "tensorflow-privacy", "dp-accounting", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | final accuracy | record-level epsilon (delta) | wall time (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        eps = "-" if r["record_epsilon"] is None else f"{r['record_epsilon']:.2f} ({r['delta']:g})"
        lines.append(f"| {r['preset']} | {r['final_accuracy']:.4f} | {eps} | {r['wall_time_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to both runs")
    parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="default benchmarks/results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
        rows = [run_preset(p, args.overrides, Path(tmp) / p) for p in PRESETS]
    dp, baseline = rows
    gap_pp = 100 * (baseline["final_accuracy"] - dp["final_accuracy"])
    eps = dp["record_epsilon"]
    met = gap_pp <= TARGET_GAP_PP and eps is not None and eps <= TARGET_EPSILON
    verdict = (
        f"accuracy gap {gap_pp:.1f} pp at epsilon {'unknown' if eps is None else format(eps, '.2f')}: "
        f"target (<= {TARGET_GAP_PP:g} pp at epsilon <= {TARGET_EPSILON:g}) {'met' if met else 'MISSED'}; "
        f"wall-time ratio DP/no-DP {dp['wall_time_s'] / baseline['wall_time_s']:.2f}"
    )
    report = f"{table(rows)}\n\n{verdict}\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "accuracy_gap_pp": gap_pp, "target_met": met,
               "overrides": args.overrides, "machine": machine()}
    (args.out / "dp_vs_nodp.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "dp_vs_nodp.md").write_text(
        f"# quickstart vs no-dp\n\nSame data and seed, run one after the other on "
        f"{payload['machine']['cpus']} CPUs ({payload['machine']['platform']}).\n\n{report}"
    )
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
