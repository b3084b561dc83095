"""Simulation scale: peak memory and seconds per round as the population grows, side by side.

Runs ``fedpriv simulate`` (the quickstart's DP-SGD and SecAgg+, with the small MLP on
scikit-learn's digits) at populations of 100, 1,000 and 100,000 virtual clients, with 10 and then
100 of them sampled each round, and the same seed. Each population gets a data file of the digits
repeated so that every client holds 4 records (and the same 360 test records): a client's local
work (one DP-SGD step at batch size 64) is the same at every population, and what differs between
the runs is the population. The data file grows with the population (100,000 clients hold
400,000 records, 100 MB), as a real population's data would. Within each sample size the runs
alternate (100, 1,000, 100,000, then backwards with --repeats 2), so machine noise hits all alike.

Measured for each run:

- peak memory of the whole process tree (the ``fedpriv simulate`` driver, Ray's own processes and
  its workers), sampled from /proc every --interval seconds: the sum of every process's resident
  set (RSS, which counts pages shared between processes, such as TensorFlow's libraries, once per
  process) and of its proportional set (PSS, which shares them out), and the driver's own RSS;
- seconds per round, from the run's ``summary.json`` (``rounds[].seconds``: from one server-side
  evaluation to the next), round 1 (Ray workers starting, TensorFlow tracing) left out;
- how many node state directories (``nodes/sim-<i>``) the run created: one per client that
  trained, not one per client in the population.

Targets, for each sample size, the largest population against the next (100,000 against 1,000):
peak RSS at most 1.2x; median seconds per round within 1.3x.

    uv run python benchmarks/scale.py [--quick] [--populations 100,1000,100000] [--sampled 10,100]
        [--rounds 6] [--repeats 2] [--seed 42] [--out DIR] [--check]

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
RECORDS_PER_CLIENT = 4
FULL = {"populations": (100, 1000, 100_000), "sampled": (10, 100), "rounds": 6, "repeats": 2, "batch_size": 64,
        "interval": 0.25}
# Quick (the test suite's): the shape of the full run at its smallest. Memory is sampled less often
# (reading every process's smaps_rollup costs CPU the run itself would otherwise have).
# One Ray worker (each reserves every CPU): a worker's start, TensorFlow's import, is most of a
# quick run's work.
QUICK = {"populations": (100, 1000), "sampled": (3,), "rounds": 2, "repeats": 1, "batch_size": 64, "interval": 0.5,
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
def data_file(population: int, folder: Path, seed: int) -> tuple[Path, float]:
    """The digits, repeated to :data:`RECORDS_PER_CLIENT` training records per client, then the
    digits' own test records: the file and the test fraction that splits them off again."""
    import numpy as np

    from fedpriv.common.config import DataSection
    from fedpriv.common.data import load_dataset

    path = folder / f"digits-{population}.npz"
    digits = load_dataset(DataSection(dataset="digits"), seed)
    if not path.exists():
        train = np.resize(np.arange(len(digits.y_train)), population * RECORDS_PER_CLIENT)
        np.savez(path, x=np.concatenate([digits.x_train[train], digits.x_test]).astype(np.float32),
                 y=np.concatenate([digits.y_train[train], digits.y_test]))
    test = len(digits.y_test)
    return path, test / (population * RECORDS_PER_CLIENT + test)


def overrides(population: int, sampled: int, settings: dict, seed: int, data: tuple[Path, float]) -> list[str]:
    """Quickstart settings for ``population`` clients of which ``sampled`` train each round."""
    path, test_fraction = data
    return [
        "data.dataset=file", f"data.path={path}", f"data.test_fraction={test_fraction!r}", "model.name=mlp",
        f"run.rounds={settings['rounds']}",
        f"run.seed={seed}",
        f"federation.num_clients={population}",
        f"federation.fraction_train={sampled / population!r}",
        f"federation.min_train_clients={sampled}",
        f"federation.min_available_clients={population}",  # the whole population is in the pool
        f"client.batch_size={settings['batch_size']}",
    ] + ([f"simulation.cpus_per_client={os.cpu_count() or 1}"] if settings.get("one_worker") else [])


def simulate(population: int, sampled: int, settings: dict, seed: int, out: Path, data: tuple[Path, float]) -> dict:
    """One ``fedpriv simulate`` run, its process tree watched; exits on a failed run."""
    args = [sys.executable, "-m", "fedpriv", "simulate", "--preset", "quickstart", "--out", str(out)]
    interval = settings["interval"]
    for item in overrides(population, sampled, settings, seed, data):
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
        "sampled": sampled,
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
def aggregate(runs: list[dict], sampled: int, population: int) -> dict:
    """One population's figures at one sample size over its repeats: the highest peak, the median
    round."""
    mine = [r for r in runs if r["population"] == population and r["sampled"] == sampled]
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


def series(runs: list[dict], sampled: int, populations: tuple[int, ...]) -> dict:
    """One sample size: each population's figures, and the largest population's against the next."""
    figures = {str(p): aggregate(runs, sampled, p) for p in populations}
    low, high = (figures[str(p)] for p in populations[-2:])
    return {
        "populations": figures,
        "compared": [populations[-2], populations[-1]],
        "rss_ratio": high["peak_rss_bytes"] / low["peak_rss_bytes"],
        "pss_ratio": high["peak_pss_bytes"] / low["peak_pss_bytes"],
        "driver_rss_ratio": high["peak_driver_rss_bytes"] / low["peak_driver_rss_bytes"],
        "round_time_ratio": high["median_round_s"] / low["median_round_s"],
    }


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def table(all_series: dict[str, dict]) -> str:
    lines = ["| sampled per round | population | records per client | peak RSS, process tree (GiB) | "
             "peak PSS (GiB) | peak RSS, driver (GiB) | processes | seconds per round (median, range) | "
             "CPU seconds per run (all, driver) | node state dirs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sampled, one in all_series.items():
        for population, p in one["populations"].items():
            low, high = p["round_s_range"]
            lines.append(
                f"| {sampled} | {int(population):,} | {p['examples_per_client']:.1f} | {gib(p['peak_rss_bytes'])} | "
                f"{gib(p['peak_pss_bytes'])} | {gib(p['peak_driver_rss_bytes'])} | {p['peak_processes']} | "
                f"{p['median_round_s']:.2f} ({low:.2f}-{high:.2f}) | {p['cpu_s']:.0f}, {p['driver_cpu_s']:.0f} | "
                f"{p['node_dirs']} |")
    return "\n".join(lines)


def plot(all_series: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, rounds) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sampled, one in all_series.items():
        names = [f"{int(p):,}" for p in one["populations"]]
        values = list(one["populations"].values())
        memory.plot(names, [p["peak_rss_bytes"] / 2**30 for p in values], marker="o", label=f"{sampled} sampled, RSS")
        memory.plot(names, [p["peak_pss_bytes"] / 2**30 for p in values], marker="x", linestyle="--",
                    label=f"{sampled} sampled, PSS")
        rounds.plot(names, [p["median_round_s"] for p in values], marker="o", label=f"{sampled} sampled")
        for i, p in enumerate(values):
            seconds = [s for r in p["runs"] for s in r["round_seconds"][1:] if s is not None]
            rounds.scatter([i] * len(seconds), seconds, alpha=0.3, s=10)
    memory.set_title("peak memory, process tree")
    memory.set_ylabel("GiB")
    memory.set_ylim(bottom=0)
    rounds.set_title("seconds per round (after round 1; line: median)")
    rounds.set_ylim(bottom=0)
    for ax in (memory, rounds):
        ax.set_xlabel("population (virtual clients)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(payload: dict) -> list[dict]:
    """Each figure with its target and whether it was met (run_all.py prints these too); a quick
    run (one timed round) is not judged."""
    quick = payload["quick"]
    out = []
    for sampled, one in payload["series"].items():
        low, high = one["compared"]
        where = f"{high:,} / {low:,} clients, {sampled} sampled"
        out.append({"figure": f"peak RSS, process tree, {where}", "value": one["rss_ratio"],
                    "target": f"<= {TARGET_RSS_RATIO}", "met": None if quick else one["rss_ratio"] <= TARGET_RSS_RATIO})
        ratio = one["round_time_ratio"]
        out.append({"figure": f"seconds per round, {where}", "value": ratio,
                    "target": f"within {TARGET_ROUND_TIME_RATIO}x",
                    "met": None if quick else max(ratio, 1 / ratio) <= TARGET_ROUND_TIME_RATIO})
    return out


def verdict(met: bool | None) -> str:
    return "not judged (quick)" if met is None else "met" if met else "MISSED"


def save(out: Path, runs: list[dict], settings: dict, seed: int, quick: bool, wall: float) -> tuple[dict, str]:
    populations = tuple(settings["populations"])
    all_series = {str(k): series(runs, k, populations) for k in settings["sampled"]}
    payload: dict[str, Any] = {
        "series": all_series,
        "seed": seed,
        "quick": quick,
        "settings": {**settings, "populations": list(populations), "sampled": list(settings["sampled"]),
                     "records_per_client": RECORDS_PER_CLIENT, "preset": "quickstart", "model": "mlp",
                     "data": "digits, repeated to records_per_client training records per client"},
        "wall_time_s": wall,
        "machine": {**{k: v for k, v in machine().items() if k != "versions"}, "cpu": cpu_model()},
        "versions": versions(),
    }
    payload["targets"] = verdicts(payload)
    report = table(all_series)
    lines = [f"- {v['figure']}: {v['value']:.2f}x (target {v['target']}): {verdict(v['met'])}"
             for v in payload["targets"]]
    for sampled, one in all_series.items():
        lines.append(f"- {sampled} sampled: peak PSS ratio {one['pss_ratio']:.2f}x; driver's own peak RSS ratio "
                     f"{one['driver_rss_ratio']:.2f}x")
    report += "\n\n" + "\n".join(lines)
    m = payload["machine"]
    header = (
        f"`fedpriv simulate --preset quickstart` (DP-SGD, SecAgg+) with the small MLP on the digits, "
        f"repeated to {RECORDS_PER_CLIENT} training records per client, at each population; "
        f"{' and '.join(map(str, settings['sampled']))} clients sampled per round, {settings['rounds']} rounds, "
        f"batch size {settings['batch_size']} (one local step per sampled client at every population), "
        f"{settings['repeats']} run(s) per population, alternating. Peak memory: the highest of the "
        f"runs, sampled from /proc over the whole process tree (driver, Ray and its workers). Seconds "
        f"per round: median of rounds 2-{settings['rounds']} over the runs. On {m['cpus']} CPUs "
        f"({m['cpu']}, {m['platform']}); seed {seed}; Python {m['python']}, flwr "
        f"{payload['versions'].get('flwr')}, TensorFlow {payload['versions'].get('tensorflow')}, "
        f"TF Privacy {payload['versions'].get('tensorflow-privacy')}. Wall time {wall:.0f} s.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(all_series, out / "scale.png")
    (out / "scale.md").write_text(f"# Simulation scale\n\n{header}\n\n{report}\n\n![scale](scale.png)\n")
    return payload, report


def csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for tests: populations {QUICK['populations']}, {QUICK['sampled']} "
                             f"sampled, {QUICK['rounds']} rounds")
    parser.add_argument("--populations", type=csv_ints, default=None,
                        help="two or more populations, smallest first (default 100,1000,100000)")
    parser.add_argument("--sampled", type=csv_ints, default=None, help="clients sampled per round (default 10,100)")
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
    populations, sampled = tuple(settings["populations"]), tuple(settings["sampled"])
    if len(populations) < 2 or list(populations) != sorted(set(populations)) or not sampled \
            or populations[0] < max(sampled):
        parser.error("--populations takes two or more populations, smallest first, each at least every --sampled")
    if settings["rounds"] < 2 or settings["repeats"] < 1 or min(sampled) < 3:
        parser.error("--rounds must be at least 2 (round 1 is not timed), --repeats at least 1, "
                     "--sampled at least 3 (SecAgg+)")
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedpriv-scale-quick-")) if args.quick else RESULTS)

    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedpriv-scale-") as tmp:
        data = {p: data_file(p, Path(tmp), args.seed) for p in populations}
        for k in sampled:
            for repeat in range(settings["repeats"]):
                order = populations if repeat % 2 == 0 else populations[::-1]
                for population in order:
                    print(f"  {k} sampled, population {population:,}, run {repeat + 1} ...", file=sys.stderr,
                          flush=True)
                    run = simulate(population, k, settings, args.seed,
                                   Path(tmp) / f"{k}-{population}-{repeat}", data[population])
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
