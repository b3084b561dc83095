"""The whole benchmark harness in one command: every benchmark, then one summary with targets.

Runs, one after the other, each in its own process (so none inherits another's warm caches):

- ``dp_step.py``: DP-SGD step cost against non-private training (dp_step.json, .md);
- ``flower_baseline.py``: fedpriv's no-dp run and the quickstart against the same learning job
  written on plain Flower, interleaved (flower_baseline.json, .md); its quickstart and no-dp runs
  also give the accuracy the quickstart's DP costs.

Then prints every Markdown table and writes summary.md and summary.json beside them: the machine,
the versions, the seed, and each figure with its target and whether it was met, the harness's own
wall time included (target: under 15 minutes on 2 CPU cores). Not part of it, each with its own
command: ``scale.py`` (100 to 100,000 virtual clients, about 14 minutes: ``make bench-scale``),
``dp_vs_nodp.py`` (``make bench``) and ``secagg.py`` (SecAgg+ overhead and accuracy against epsilon,
about 35 minutes: ``make bench-secagg``).

    uv run python benchmarks/run_all.py [--quick] [--skip NAME,...] [--seed N] [--out DIR] [--check]

``--quick`` runs tiny versions of both into a temporary folder unless --out is
given, so a quick run never replaces the full results; the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dp_step import cpu_model, versions  # noqa: E402
from dp_vs_nodp import RESULTS, machine  # noqa: E402

SEED = 42
TARGET_WALL_S = 15 * 60
BENCHMARKS = ("dp_step", "flower_baseline")


def command(name: str, quick: bool, seed: int, out: Path) -> list[str]:
    args = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out), "--seed", str(seed)]
    if name == "dp_step":
        args += ["--device", "cpu"]  # the GPU path has its own check (gpu_check.sh)
    return args + (["--quick"] if quick else [])


def run(name: str, quick: bool, seed: int, out: Path) -> dict[str, Any]:
    """Run one benchmark (its progress goes to stderr as it comes); its table and wall time."""
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command(name, quick, seed, out), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    print(f"   {name}: {wall:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "exit_code": proc.returncode, "wall_time_s": wall, "table": proc.stdout.strip()}


# ---- figures and targets ----------------------------------------------------------------------
DP_STEP_TARGET = 1.15  # the default DP path's step time at most 1.15x non-private (CPU, batch 64 and 256)


def dp_step_figures(results: dict) -> list[dict]:
    """The default path's step time against non-private, per model and batch size, against the
    target at the full benchmark's batch sizes (a quick run's batch has none), with the
    textbook baseline beside it."""
    figures = []
    for model in ("cnn", "mlp"):
        for batch, entry in results.get(model, {}).items():
            ratio = entry.get("default_ratio")
            if ratio is None:
                continue
            judged = batch in ("64", "256")
            textbook = entry.get("textbook_ratio")
            baseline = f"; textbook {textbook:.1f}x" if textbook is not None else "; textbook skipped"
            clipping, draw = entry.get("clipping_only_ratio"), entry.get("noise_draw_ratio")
            fixed = entry.get("fixed_noise_ratio")
            split = (f"; clipping alone {clipping:.2f}x, noise draw alone {draw:.2f}x"
                     if clipping is not None and draw is not None else "")
            split += f"; noise from a fixed pool {fixed:.2f}x" if fixed is not None else ""
            figures.append({"figure": f"DP-SGD step time / non-private, {model}, batch {batch} "
                                      f"(default: {entry.get('default_implementation')}{baseline}{split})",
                            "value": ratio, "unit": "x", "target": f"<= {DP_STEP_TARGET}" if judged else None,
                            "met": bool(ratio <= DP_STEP_TARGET) if judged else None})
    return figures


def flower_baseline_figures(results: dict) -> list[dict]:
    targets, judged = results["targets"], not results.get("quick")
    accuracy = results["accuracy"]
    gap_pp = 100 * (accuracy["fedpriv no-dp"] - accuracy["fedpriv quickstart"])

    def figure(name: str, value: float, unit: str, target: float | None, met: bool | None) -> dict:
        return {"figure": name, "value": value, "unit": unit, "target": f"<= {target}" if target and judged else None,
                "met": met if judged else None}

    return [
        figure("whole command, fedpriv no-dp / plain Flower", results["ratio"], "x", targets["ratio"],
               results["ratio"] <= targets["ratio"]),
        figure("seconds per round, fedpriv no-dp / plain Flower", results["round_ratio"], "x", None, None),
        figure("seconds per round, quickstart (DP-SGD + SecAgg+) / plain Flower", results["quickstart_ratio"], "x",
               targets["quickstart_ratio"], results["quickstart_ratio"] <= targets["quickstart_ratio"]),
        figure("final accuracy, fedpriv no-dp against plain Flower (absolute difference)",
               results["accuracy_gap_no_dp"], "",
               targets["accuracy_gap_no_dp"], results["accuracy_gap_no_dp"] <= targets["accuracy_gap_no_dp"]),
        {"figure": f"accuracy gap, quickstart vs no-dp (SecAgg+ off; quickstart record-level epsilon "
                   f"{results['quickstart_record_epsilon']:.2f})", "value": gap_pp, "unit": " pp",
         "target": "<= 10 pp" if judged else None, "met": gap_pp <= 10 if judged else None},
    ]


FIGURES = {"dp_step": dp_step_figures, "flower_baseline": flower_baseline_figures}


def figures_of(name: str, out: Path, since: float) -> list[dict]:
    """The figures of ``name``'s results, if this harness run wrote them (at or after ``since``)."""
    path = out / f"{name}.json"
    if not path.is_file() or path.stat().st_mtime < since:
        return [{"figure": f"{name}: no results", "value": None, "unit": "", "target": "runs", "met": False}]
    return FIGURES[name](json.loads(path.read_text()))


def verdict(figure: dict) -> str:
    if figure["met"] is None:
        return "-"
    return "pass" if figure["met"] else "FAIL"


def value(figure: dict) -> str:
    if figure["value"] is None:
        return "-"
    return f"{figure['value']:.2f}{figure['unit']}"


def summary_table(figures: list[dict]) -> str:
    lines = ["| benchmark | figure | measured | target | result |", "|---|---|---:|---|---|"]
    for f in figures:
        lines.append(f"| {f['benchmark']} | {f['figure']} | {value(f)} | {f['target'] or '-'} | {verdict(f)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny versions of every benchmark (for tests)")
    parser.add_argument("--skip", default="", help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(BENCHMARKS):
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if n not in skip]
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedpriv-bench-quick-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    started, since = time.perf_counter(), time.time()
    runs = [run(name, args.quick, args.seed, out) for name in names]
    wall = time.perf_counter() - started

    figures = []
    for r in runs:
        if r["exit_code"] != 0:
            figures.append({"benchmark": r["name"], "figure": f"exit code {r['exit_code']}", "value": None,
                            "unit": "", "target": "0", "met": False})
        for f in figures_of(r["name"], out, since):
            figures.append({"benchmark": r["name"], **f})
    figures.append({"benchmark": "harness", "figure": "wall time" + (" (quick mode)" if args.quick else ""),
                    "value": wall / 60, "unit": " min",
                    "target": None if args.quick else f"< {TARGET_WALL_S // 60} min on 2 CPU cores",
                    "met": None if args.quick else wall < TARGET_WALL_S})
    info = {**{k: v for k, v in machine().items() if k != "versions"}, "cpu": cpu_model()}
    payload = {"quick": args.quick, "seed": args.seed, "benchmarks": names, "wall_time_s": wall,
               "runs": [{k: v for k, v in r.items() if k != "table"} for r in runs],
               "figures": figures, "machine": info, "versions": versions(),
               "all_targets_met": all(f["met"] is not False for f in figures)}
    vs = payload["versions"]
    header = (f"`benchmarks/run_all.py{' --quick' if args.quick else ''}` on {info['cpus']} CPUs "
              f"({info['cpu']}, {info['platform']}), seed {args.seed}, {wall / 60:.1f} min in all. "
              f"Python {vs.get('python')}, flwr {vs.get('flwr')}, TensorFlow {vs.get('tensorflow')}, "
              f"tf-keras {vs.get('tf-keras')}, TF Privacy {vs.get('tensorflow-privacy')}, dp-accounting "
              f"{vs.get('dp-accounting')}, numpy {vs.get('numpy')}. Every figure is a ratio measured side "
              f"by side in one process or one harness run; the details are in each benchmark's file. "
              f"Not run here: `make bench-scale` ([scale.md](scale.md)), `make bench` "
              f"([dp_vs_nodp.md](dp_vs_nodp.md)) and `make bench-secagg` (SecAgg+ overhead, about 35 minutes; "
              f"[secagg.md](secagg.md)).")
    sections = [f"# Benchmarks\n\n{header}\n\n{summary_table(figures)}\n"]
    for r in runs:
        sections.append(f"## {r['name']} ([{r['name']}.md]({r['name']}.md))\n\n{r['table']}\n")
    report = "\n".join(sections)
    (out / "summary.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(report)
    print(f"wrote {out / 'summary.md'} and summary.json ({wall:.0f} s)", file=sys.stderr)
    failed = [r["name"] for r in runs if r["exit_code"] != 0]
    if failed:
        print(f"error: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0 if payload["all_targets_met"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
