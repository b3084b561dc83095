"""fedpriv against plain Flower: the quickstart's learning job written directly on Flower 1.42.

Three commands, each timed whole (start-up included) in its own process, interleaved in a
shuffled order every repetition so machine noise hits all of them alike:

- ``plain``: this file with ``--plain`` (the app is in ``plain_flower.py``): a plain Flower simulation (``flwr.simulation.
  run_simulation``, the legacy ``ServerApp``/``ClientApp`` with ``FedAvg`` and a ``NumPyClient``,
  tf-keras), no DP and no SecAgg+, of the quickstart's learning job: the same model (the seed
  CNN, tanh), data split (the built-in data, IID, seed 42), initial weights (Keras seeded with the
  run seed, as fedpriv's server does), rounds, clients, batch size, epochs, Poisson batches,
  optimizer (SGD, momentum 0.5, state reset each round) and learning rate, and the same
  centralized evaluation on the server's test split after every round. It takes the data and the
  model from fedpriv's own loaders so both sides train on the same arrays, and runs under the same
  TensorFlow environment (``common.tf_runtime.RUNTIME_ENV``) and one CPU per virtual client;
- ``fedpriv no-dp``: ``fedpriv simulate --preset no-dp --set secure_aggregation.enabled=false``;
- ``fedpriv quickstart``: ``fedpriv simulate`` (DP-SGD and hardened SecAgg+).

Figures (medians over the repetitions):

- ``ratio``: wall time of the whole command, fedpriv no-dp over plain Flower (target <= 1.05);
- ``round_ratio``: median seconds per round (from one evaluation to the next), the same two;
- ``quickstart_ratio``: the quickstart's median seconds per round over plain Flower's (target <= 1.4);
- each run's final accuracy (fedpriv no-dp within 0.02 of plain Flower).

    uv run python benchmarks/flower_baseline.py [--quick] [--repeats N] [--rounds N] [--clients N]
        [--seed N] [--out DIR]

Saves flower_baseline.json and .md in --out (default benchmarks/results; with --quick and no
--out, a temporary folder, so a quick run never replaces the full results). Full runs give each
virtual client one CPU; --quick gives it every CPU, on both sides (one Ray worker a run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from dp_vs_nodp import RESULTS, machine  # noqa: E402

SEED = 42
FULL = {"repeats": 3, "rounds": 20, "clients": 10}  # (one run varies by 5-10 s on 2 shared cores)
QUICK = {"repeats": 1, "rounds": 2, "clients": 3}  # SecAgg+ needs 3 clients a round
# Quick runs (the test suite's) give each virtual client every CPU, on both sides: one Ray worker,
# whose start (TensorFlow's import, the model's trace) is most of a quick run's work; a second one
# costs about 17 CPU seconds a run. Full runs give each client one CPU, as fedpriv's default does.
KINDS = ("plain", "fedpriv no-dp", "fedpriv quickstart")
TARGET_RATIO, TARGET_QUICKSTART_RATIO, TARGET_ACCURACY_GAP = 1.05, 1.4, 0.02


def job_settings(rounds: int, clients: int, seed: int, cpus: float = 1.0) -> list[str]:
    """The ``--set`` overrides every run shares (on the no-dp preset, with SecAgg+ off, they are
    the whole of plain Flower's job too: ``plain_flower.learning_job``); ``cpus``: each virtual
    client's Ray CPUs, plain Flower's ``client_resources`` too."""
    return [f"run.rounds={rounds}", f"federation.num_clients={clients}",
            f"federation.min_available_clients={clients}", f"run.seed={seed}",
            f"simulation.cpus_per_client={cpus:g}"]


def cpus_per_client(quick: bool) -> float:
    return float(os.cpu_count() or 1) if quick else 1.0


NO_SECAGG = "secure_aggregation.enabled=false"


def run_kind(kind: str, rounds: int, clients: int, seed: int, tmp: Path, index: int, cpus: float = 1.0) -> dict:
    """Run one command as a user would; its wall time, seconds per round and final accuracy."""
    out = tmp / f"{kind.replace(' ', '-')}-{index}"
    if kind == "plain":
        args = [sys.executable, __file__, "--plain", "--rounds", str(rounds), "--clients", str(clients),
                "--seed", str(seed), "--cpus-per-client", f"{cpus:g}", "--out", str(out.with_suffix(".json"))]
    else:
        preset = "no-dp" if kind == "fedpriv no-dp" else "quickstart"
        args = [sys.executable, "-m", "fedpriv", "simulate", "--preset", preset, "--out", str(out)]
        for item in job_settings(rounds, clients, seed, cpus) + ([NO_SECAGG] if preset == "no-dp" else []):
            args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPRIV_")}
    env["FEDPRIV_HOME"] = str(tmp / "home")  # a fresh home: its checkpoint key is made on first use
    if kind == "plain":  # Ray's workers import the plain app's module by name
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: {kind} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    if kind == "plain":
        result = json.loads(out.with_suffix(".json").read_text())
        seconds, accuracy, epsilon = result["round_seconds"], result["final_accuracy"], None
    else:
        summary = json.loads((out / "summary.json").read_text())
        seconds = [r["seconds"] for r in summary["rounds"] if r.get("seconds") is not None]
        accuracy = summary["final_accuracy"]
        epsilon = (summary.get("privacy", {}).get("record_level") or {}).get("max_epsilon")
    if len(seconds) != rounds:
        sys.exit(f"error: {kind} timed {len(seconds)} rounds of {rounds}")
    return {"kind": kind, "wall_s": wall, "round_s": statistics.median(seconds), "final_accuracy": accuracy,
            "record_epsilon": epsilon}


def report(runs: list[dict], settings: dict, seed: int, wall: float) -> tuple[dict, str]:
    by_kind = {kind: [r for r in runs if r["kind"] == kind] for kind in KINDS}
    med = {kind: {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "round_s", "final_accuracy")}
           for kind, rows in by_kind.items()}
    plain, nodp, quick = med["plain"], med["fedpriv no-dp"], med["fedpriv quickstart"]
    payload = {
        "ratio": nodp["wall_s"] / plain["wall_s"],
        "round_ratio": nodp["round_s"] / plain["round_s"],
        "quickstart_ratio": quick["round_s"] / plain["round_s"],
        "quickstart_wall_ratio": quick["wall_s"] / plain["wall_s"],
        "accuracy": {kind: m["final_accuracy"] for kind, m in med.items()},
        "accuracy_gap_no_dp": abs(nodp["final_accuracy"] - plain["final_accuracy"]),
        "quickstart_record_epsilon": by_kind["fedpriv quickstart"][0]["record_epsilon"],
        "medians": med,
        "runs": runs,
        "targets": {"ratio": TARGET_RATIO, "quickstart_ratio": TARGET_QUICKSTART_RATIO,
                    "accuracy_gap_no_dp": TARGET_ACCURACY_GAP},
        "settings": settings,
        "seed": seed,
        "wall_time_s": wall,
        "machine": machine(),
    }
    lines = [
        f"| run ({settings['clients']} clients, {settings['rounds']} rounds) | wall s, median | ratio "
        f"| s/round, median | ratio | final accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"plain": "plain Flower 1.42 + tf-keras, FedAvg, no DP, no SecAgg+",
             "fedpriv no-dp": "`fedpriv simulate --preset no-dp --set secure_aggregation.enabled=false`",
             "fedpriv quickstart": "`fedpriv simulate` (quickstart: DP-SGD + SecAgg+)"}
    for kind in KINDS:
        m = med[kind]
        lines.append(f"| {names[kind]} | {m['wall_s']:.1f} | {m['wall_s'] / plain['wall_s']:.2f}x | {m['round_s']:.2f} "
                     f"| {m['round_s'] / plain['round_s']:.2f}x | {m['final_accuracy']:.3f} |")
    verdicts = [
        f"- ratio (whole command, no-dp / plain): {payload['ratio']:.2f} (target <= {TARGET_RATIO}): "
        f"{'met' if payload['ratio'] <= TARGET_RATIO else 'MISSED'}",
        f"- round_ratio (no-dp / plain): {payload['round_ratio']:.2f}",
        f"- quickstart_ratio (quickstart s/round / plain): {payload['quickstart_ratio']:.2f} "
        f"(target <= {TARGET_QUICKSTART_RATIO}): "
        f"{'met' if payload['quickstart_ratio'] <= TARGET_QUICKSTART_RATIO else 'MISSED'}",
        f"- accuracy, no-dp against plain: {payload['accuracy_gap_no_dp']:.3f} apart "
        f"(target <= {TARGET_ACCURACY_GAP}): "
        f"{'met' if payload['accuracy_gap_no_dp'] <= TARGET_ACCURACY_GAP else 'MISSED'}",
    ]
    return payload, "\n".join(lines) + "\n\n" + "\n".join(verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for tests: {QUICK['clients']} clients, {QUICK['rounds']} rounds, once")
    parser.add_argument("--repeats", type=int, default=None, help=f"interleaved repetitions (default {FULL['repeats']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']}")
    parser.add_argument("--clients", type=int, default=None, help=f"default {FULL['clients']}")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # one plain Flower run
    parser.add_argument("--cpus-per-client", type=float, default=None, help=argparse.SUPPRESS)  # (with --plain)
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    for key in ("repeats", "rounds", "clients"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if min(settings.values()) < 1 or settings["clients"] < 3:
        parser.error("--repeats and --rounds must be positive, --clients at least 3 (SecAgg+ needs 3)")
    if args.plain:
        from plain_flower import run  # the worker processes import it too: it must be a module of its own

        run(settings["rounds"], settings["clients"], args.seed, args.out,
            args.cpus_per_client or cpus_per_client(args.quick))
        return 0
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedpriv-flower-baseline-quick-")) if args.quick else RESULTS)
    settings["cpus_per_client"] = cpus_per_client(args.quick)

    started = time.perf_counter()
    runs = []
    order = list(KINDS)
    shuffler = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fedpriv-flower-baseline-") as tmp:
        for repeat in range(settings["repeats"]):
            shuffler.shuffle(order)
            for kind in order:
                print(f"  {kind} ({repeat + 1}/{settings['repeats']}) ...", file=sys.stderr, flush=True)
                runs.append(run_kind(kind, settings["rounds"], settings["clients"], args.seed, Path(tmp), repeat,
                                     settings["cpus_per_client"]))
    payload, table = report(runs, settings, args.seed, time.perf_counter() - started)
    payload["quick"] = args.quick
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_baseline.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "flower_baseline.md").write_text(
        f"# fedpriv against plain Flower\n\nThe quickstart's learning job, three commands interleaved "
        f"({settings['repeats']} repetitions, medians), on {payload['machine']['cpus']} CPUs; seed {args.seed}. "
        f"See benchmarks/flower_baseline.py for what is the same on both sides.\n\n{table}\n")
    print(table)
    print(f"\nwrote {out / 'flower_baseline.json'} and .md ({payload['wall_time_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
