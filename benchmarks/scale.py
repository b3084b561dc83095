"""Simulation scale: peak memory and seconds per round at two populations, side by side.

Runs ``fedpriv simulate`` (the quickstart: the seed CNN with DP-SGD, SecAgg+ on, the built-in
data) at a population of 100 and of 1,000 virtual clients, with the same number sampled each
round (10) and the same seed. The built-in data are split among the whole population, so a client
holds about 45 records at 100 and 4-5 at 1,000; the batch size (64) makes every sampled client take
exactly one local DP-SGD step at both, so what differs between the runs is the population, not
the local work. The runs alternate (100, 1,000, then 1,000, 100 with --repeats 2), so machine noise
hits both alike.

Measured for each run:

- peak memory of the whole process tree (the ``fedpriv simulate`` driver, Ray's own processes and
  its workers), sampled from /proc every --interval seconds: the sum of every process's resident
  set (RSS, which counts pages shared between processes, such as TensorFlow's libraries, once per
  process) and of its proportional set (PSS, which shares them out), and the driver's own RSS;
- seconds per round, from the run's ``summary.json`` (``rounds[].seconds``: from one server-side
  evaluation to the next), round 1 (Ray workers starting, TensorFlow tracing) left out;
- how many node state directories (``nodes/sim-<i>``) the run created: one per client that
  trained, not one per client in the population.

Targets: peak RSS at 1,000 at most 1.2x that at 100; median seconds per round within 1.3x.

    uv run python benchmarks/scale.py [--quick] [--populations 100,1000] [--sampled 10]
        [--rounds 8] [--repeats 2] [--seed 42] [--out DIR] [--check]

Prints a Markdown table and saves scale.json, scale.md and scale.png in --out (default
benchmarks/results; with --quick and no --out, a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from dp_step import cpu_model, versions  # noqa: E402
from dp_vs_nodp import RESULTS, machine  # noqa: E402

SEED = 42
TARGET_RSS_RATIO = 1.2
TARGET_ROUND_TIME_RATIO = 1.3
FULL = {"populations": (100, 1000), "sampled": 10, "rounds": 8, "repeats": 2, "batch_size": 64, "interval": 0.25}
# Quick (the test suite's): the shape of the full run at its smallest. Memory is sampled less often
# (reading every process's smaps_rollup costs CPU the run itself would otherwise have).
# One Ray worker (each reserves every CPU): a worker's start, TensorFlow's import, is most of a
# quick run's work.
QUICK = {"populations": (100, 1000), "sampled": 3, "rounds": 2, "repeats": 1, "batch_size": 64, "interval": 0.5,
         "one_worker": True}
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


# ---- the process tree's memory ---------------------------------------------------------------
def descendants(root: int) -> dict[int, float]:
    """``root`` and every process below it (Ray's processes and workers included), from /proc:
    pid -> CPU seconds it has used so far."""
    children: dict[int, list[int]] = defaultdict(list)
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children[int(fields[1])].append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the memory of a process tree until stopped; keeps the peaks."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_driver_rss = 0
        self.peak_processes = self.samples = 0
        self.cpu_s: dict[int, float] = {}  # pid -> CPU seconds at its last sample

    @property
    def tree_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    def run(self) -> None:
        while not self.stop.is_set():
            tree = descendants(self.root)
            self.cpu_s.update(tree)
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in tree))
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in tree))
            self.peak_driver_rss = max(self.peak_driver_rss, rss_bytes(self.root))
            self.peak_processes = max(self.peak_processes, len(tree))
            self.samples += 1
            self.stop.wait(self.interval)


# ---- one run -----------------------------------------------------------------------------------
def overrides(population: int, settings: dict, seed: int) -> list[str]:
    """Quickstart settings for ``population`` clients of which ``sampled`` train each round."""
    sampled = settings["sampled"]
    return [
        f"run.rounds={settings['rounds']}",
        f"run.seed={seed}",
        f"federation.num_clients={population}",
        f"federation.fraction_train={sampled / population!r}",
        f"federation.min_train_clients={sampled}",
        f"federation.min_available_clients={population}",  # the whole population is in the pool
        f"client.batch_size={settings['batch_size']}",
    ] + ([f"simulation.cpus_per_client={os.cpu_count() or 1}"] if settings.get("one_worker") else [])


def simulate(population: int, settings: dict, seed: int, out: Path, interval: float) -> dict:
    """One ``fedpriv simulate`` run, its process tree watched; exits on a failed run."""
    args = [sys.executable, "-m", "fedpriv", "simulate", "--preset", "quickstart", "--out", str(out)]
    for item in overrides(population, settings, seed):
        args += ["--set", item]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watch = TreeMemory(proc.pid, interval)
        watch.start()
        code = proc.wait()
        watch.stop.set()
        watch.join()
        wall = time.perf_counter() - started
        if code != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            sys.exit(f"error: population {population} failed (exit {code}): " + " / ".join(tail))
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    seconds = [r["seconds"] for r in rounds[1:] if r["seconds"] is not None]
    nodes = out / "nodes"
    return {
        "population": population,
        "peak_rss_bytes": watch.peak_rss,
        "peak_pss_bytes": watch.peak_pss,
        "peak_driver_rss_bytes": watch.peak_driver_rss,
        "peak_processes": watch.peak_processes,
        "memory_samples": watch.samples,
        "cpu_s": watch.tree_cpu_s,
        "driver_cpu_s": watch.cpu_s.get(proc.pid, 0.0),
        "round_seconds": [r["seconds"] for r in rounds],
        "median_round_s": statistics.median(seconds) if seconds else None,
        "clients_trained": [r["clients_trained"] for r in rounds],
        "failed_rounds": sum(1 for r in rounds if r.get("failed")),
        "distinct_clients_trained": len(summary["privacy"]["record_level"]["clients"]),
        "node_dirs": sum(1 for p in nodes.iterdir() if p.is_dir()) if nodes.is_dir() else 0,
        "examples_per_client": summary["dataset"]["train_examples"] / population,
        "final_accuracy": summary["final_accuracy"],
        "wall_time_s": wall,
    }


# ---- the report --------------------------------------------------------------------------------
def aggregate(runs: list[dict], population: int) -> dict:
    """One population's figures over its repeats: the highest peak, the median round."""
    mine = [r for r in runs if r["population"] == population]
    later = [s for r in mine for s in r["round_seconds"][1:] if s is not None]
    return {
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
        "peak_pss_bytes": max(r["peak_pss_bytes"] for r in mine),
        "peak_driver_rss_bytes": max(r["peak_driver_rss_bytes"] for r in mine),
        "peak_processes": max(r["peak_processes"] for r in mine),
        "median_round_s": statistics.median(later),
        "round_s_range": [min(later), max(later)],
        "rounds_timed": len(later),
        "clients_per_round": sorted({c for r in mine for c in r["clients_trained"]}),
        "distinct_clients_trained": max(r["distinct_clients_trained"] for r in mine),
        "node_dirs": max(r["node_dirs"] for r in mine),
        "cpu_s": statistics.median(r["cpu_s"] for r in mine),
        "driver_cpu_s": statistics.median(r["driver_cpu_s"] for r in mine),
        "examples_per_client": mine[0]["examples_per_client"],
        "runs": mine,
    }


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def table(populations: dict[str, dict]) -> str:
    lines = ["| population | sampled per round | records per client | peak RSS, process tree (GiB) | "
             "peak PSS (GiB) | peak RSS, driver (GiB) | processes | seconds per round (median, range) | "
             "CPU seconds per run (all, driver) | node state dirs |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for population, p in populations.items():
        low, high = p["round_s_range"]
        lines.append(
            f"| {int(population):,} | {', '.join(map(str, p['clients_per_round']))} | "
            f"{p['examples_per_client']:.1f} | {gib(p['peak_rss_bytes'])} | {gib(p['peak_pss_bytes'])} | "
            f"{gib(p['peak_driver_rss_bytes'])} | {p['peak_processes']} | "
            f"{p['median_round_s']:.2f} ({low:.2f}-{high:.2f}) | {p['cpu_s']:.0f}, {p['driver_cpu_s']:.0f} | "
            f"{p['node_dirs']} |")
    return "\n".join(lines)


def plot(populations: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{int(p):,}" for p in populations]
    fig, (memory, rounds) = plt.subplots(1, 2, figsize=(9, 3.6))
    memory.bar(names, [p["peak_rss_bytes"] / 2**30 for p in populations.values()], label="RSS (sum)")
    memory.bar(names, [p["peak_pss_bytes"] / 2**30 for p in populations.values()], width=0.4,
               label="PSS (sum)")
    memory.set_title("peak memory, process tree")
    memory.set_ylabel("GiB")
    memory.set_xlabel("population")
    memory.legend(loc="lower center")
    for i, p in enumerate(populations.values()):
        seconds = [s for r in p["runs"] for s in r["round_seconds"][1:] if s is not None]
        rounds.scatter([i] * len(seconds), seconds, alpha=0.6)
        rounds.hlines(p["median_round_s"], i - 0.25, i + 0.25, color="black")
    rounds.set_xticks(range(len(names)), names)
    rounds.set_xlim(-0.6, len(names) - 0.4)
    rounds.set_ylim(bottom=0)
    rounds.set_title("seconds per round (after round 1)")
    rounds.set_xlabel("population")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(payload: dict) -> list[dict]:
    """Each figure with its target and whether it was met (run_all.py prints these too); a quick
    run (one timed round) is not judged."""
    low, high = (str(p) for p in payload["settings"]["populations"])
    rss, rounds = payload["rss_ratio"], payload["round_time_ratio"]
    quick = payload["quick"]
    return [
        {"figure": f"peak RSS, process tree, {int(high):,} / {int(low):,} clients",
         "value": rss, "target": f"<= {TARGET_RSS_RATIO}",
         "met": None if quick else rss <= TARGET_RSS_RATIO},
        {"figure": f"seconds per round, {int(high):,} / {int(low):,} clients",
         "value": rounds, "target": f"within {TARGET_ROUND_TIME_RATIO}x",
         "met": None if quick else max(rounds, 1 / rounds) <= TARGET_ROUND_TIME_RATIO},
    ]


def verdict(met: bool | None) -> str:
    return "not judged (quick)" if met is None else "met" if met else "MISSED"


def save(out: Path, runs: list[dict], settings: dict, seed: int, quick: bool, wall: float) -> tuple[dict, str]:
    populations = {str(p): aggregate(runs, p) for p in settings["populations"]}
    low, high = (populations[str(p)] for p in settings["populations"])
    payload: dict[str, Any] = {
        "populations": populations,
        "rss_ratio": high["peak_rss_bytes"] / low["peak_rss_bytes"],
        "pss_ratio": high["peak_pss_bytes"] / low["peak_pss_bytes"],
        "driver_rss_ratio": high["peak_driver_rss_bytes"] / low["peak_driver_rss_bytes"],
        "round_time_ratio": high["median_round_s"] / low["median_round_s"],
        "seed": seed,
        "quick": quick,
        "settings": {**settings, "populations": list(settings["populations"]),
                     "overrides": {str(p): overrides(p, settings, seed) for p in settings["populations"]},
                     "preset": "quickstart"},
        "wall_time_s": wall,
        "machine": {**{k: v for k, v in machine().items() if k != "versions"}, "cpu": cpu_model()},
        "versions": versions(),
    }
    payload["targets"] = verdicts(payload)
    report = table(populations)
    lines = [f"- {v['figure']}: {v['value']:.2f}x (target {v['target']}): {verdict(v['met'])}"
             for v in payload["targets"]]
    lines.append(f"- peak PSS ratio {payload['pss_ratio']:.2f}x; driver's own peak RSS ratio "
                 f"{payload['driver_rss_ratio']:.2f}x")
    report += "\n\n" + "\n".join(lines)
    m = payload["machine"]
    header = (
        f"`fedpriv simulate --preset quickstart` (seed CNN, DP-SGD, SecAgg+, built-in data) at each "
        f"population, {settings['sampled']} clients sampled per round, {settings['rounds']} rounds, "
        f"batch size {settings['batch_size']} (one local step per sampled client at every population), "
        f"{settings['repeats']} run(s) per population, alternating. Peak memory: the highest of the "
        f"runs, sampled from /proc over the whole process tree (driver, Ray and its workers). Seconds "
        f"per round: median of rounds 2-{settings['rounds']} over the runs. On {m['cpus']} CPUs "
        f"({m['cpu']}, {m['platform']}); seed {seed}; Python {m['python']}, flwr "
        f"{payload['versions'].get('flwr')}, TensorFlow {payload['versions'].get('tensorflow')}, "
        f"TF Privacy {payload['versions'].get('tensorflow-privacy')}. Wall time {wall:.0f} s.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(populations, out / "scale.png")
    (out / "scale.md").write_text(f"# Simulation scale\n\n{header}\n\n{report}\n\n![scale](scale.png)\n")
    return payload, report


def csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for tests: populations {QUICK['populations']}, {QUICK['sampled']} "
                             f"sampled, {QUICK['rounds']} rounds")
    parser.add_argument("--populations", type=csv_ints, default=None, help="two populations, default 100,1000")
    parser.add_argument("--sampled", type=int, default=None, help="clients sampled per round (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (round 1 is not timed)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per population, alternating")
    parser.add_argument("--interval", type=float, default=None,
                        help=f"seconds between memory samples (default {FULL['interval']}, "
                             f"{QUICK['interval']} with --quick)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()

    settings = dict(QUICK if args.quick else FULL)
    for key in ("populations", "sampled", "rounds", "repeats", "interval"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if len(settings["populations"]) != 2 or min(settings["populations"]) < settings["sampled"]:
        parser.error("--populations takes two populations, each at least --sampled")
    if settings["rounds"] < 2 or settings["repeats"] < 1 or settings["sampled"] < 3:
        parser.error("--rounds must be at least 2 (round 1 is not timed), --repeats at least 1, "
                     "--sampled at least 3 (SecAgg+)")
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedpriv-scale-quick-")) if args.quick else RESULTS)

    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedpriv-scale-") as tmp:
        for repeat in range(settings["repeats"]):
            order = settings["populations"] if repeat % 2 == 0 else settings["populations"][::-1]
            for population in order:
                print(f"  population {population:,}, run {repeat + 1} ...", file=sys.stderr, flush=True)
                run = simulate(population, settings, args.seed, Path(tmp) / f"{population}-{repeat}",
                               settings["interval"])
                print(f"    peak RSS {gib(run['peak_rss_bytes'])} GiB, "
                      f"{run['median_round_s']:.2f} s per round", file=sys.stderr, flush=True)
                runs.append(run)
    payload, report = save(out, runs, settings, args.seed, args.quick, time.perf_counter() - started)
    print(report)
    print(f"\nwrote {out / 'scale.json'}, scale.md and scale.png ({payload['wall_time_s']:.0f} s)",
          file=sys.stderr)
    met = all(v["met"] is not False for v in payload["targets"])
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
