"""SecAgg+ cost and the utility of each privacy layer, measured side by side in one run.

Part 1, overhead: round wall time with and without SecAgg+ (fedpriv's hardened SecAgg+: masks
expanded from full-strength seeds by AES-256-CTR, and the clients' checks on the server's
messages) for 10, 50 and 200 clients on models of about 100k parameters (the seed CNN of the
demo, 93k; and an MLP of 102k, whose rounds are so light that they show SecAgg+'s fixed
per-message cost at its worst) and about 1M parameters (an MLP), with quickstart settings
otherwise (DP-SGD on, built-in data, all clients every round). Each pair runs back to back with
the same data and seed; the per-round time is the median of the rounds after the first (which
includes start-up). Targets: at most 1.3x at 50 clients for every model, and overhead per client
growing no worse than linearly with the number of clients (SecAgg+ gives each client a fixed
number of neighbours).

Where the time goes: each run goes through ``exchange_timer.py``, which times every message
exchange of the server (one a round without SecAgg+; with it, Flower's four stages: setup, key
sharing, training with masking, unmasking) and each SecAgg+ stage as a whole (the exchange and
the server's own work). The unmasking exchange asks each client only for key shares it already
holds, so its time is close to what any exchange costs the simulation engine however little
the clients do; three such exchanges on top of the plain round give the ratio SecAgg+ would
reach if all its own computation (keys, shares, masks, quantization, unmasking) took no time:
the ``floor_ratio`` of each row.

Part 2, utility: final accuracy against epsilon on the built-in data with the same seed, with no
DP, record-level DP only, user-level DP only, and both, for two federations: ``quickstart``
(cross-silo: 10 clients of 450 records, all in every round) and ``cross-device`` (1,000 devices of
4-5 records, about 100 per round). Each layer pays off in its own setting: record-level DP where
clients hold many records, user-level DP where many clients take part in each round.

    uv run python benchmarks/secagg.py [--part overhead|utility|all] [--quick] [--check]

Prints the tables and saves them, a JSON file and a plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dp_vs_nodp import RESULTS, machine, simulate  # noqa: E402
from exchange_timer import STAGES  # noqa: E402

TIMER = Path(__file__).parent / "exchange_timer.py"

MODELS = {  # name -> settings; parameters: 93,322 / 101,770 / 1,001,710
    "100k CNN": ["model.name=cnn"],
    "100k MLP": ["model.name=mlp", "model.mlp_units=128", "model.mlp_layers=1"],
    "1M MLP": ["model.name=mlp", "model.mlp_units=1260", "model.mlp_layers=1"],
}
CLIENTS = (10, 50, 200)
TARGET_CLIENTS, TARGET_RATIO = 50, 1.3  # every model
FEDERATIONS = ("quickstart", "cross-device")
UTILITY = {
    "no DP": ["dp.enabled=false", "user_dp.enabled=false"],
    "record-level only": ["dp.enabled=true", "user_dp.enabled=false"],
    "user-level only": ["dp.enabled=false", "user_dp.enabled=true"],
    "both": ["dp.enabled=true", "user_dp.enabled=true"],
}


def overhead(tmp: Path, rounds: int, clients: tuple[int, ...]) -> list[dict]:
    rows = []
    for model, settings in MODELS.items():
        for n in clients:
            base = [f"run.rounds={rounds}", *settings, f"federation.num_clients={n}",
                    f"federation.min_available_clients={n}"]
            times, timings, params = {}, {}, None
            for secure in (True, False):
                out = tmp / f"{model}-{n}-{secure}"
                summary, timings[secure] = timed_simulate(
                    "quickstart", base + [f"secure_aggregation.enabled={str(secure).lower()}"], out)
                later = [r["seconds"] for r in summary["rounds"][1:] if r["seconds"] is not None]
                times[secure] = statistics.median(later)
                params = summary["model_parameters"]
            row = {"model": model, "parameters": params, "clients": n, "round_s_secagg": times[True],
                   "round_s_plain": times[False], "ratio": times[True] / times[False],
                   "overhead_s": times[True] - times[False]}
            row["overhead_per_client_s"] = row["overhead_s"] / n
            row.update(breakdown(timings[True], timings[False], times[False]))
            print(f"  {model} x {n} clients: {times[True]:.2f} s vs {times[False]:.2f} s "
                  f"(ratio {row['ratio']:.2f})", flush=True)
            rows.append(row)
    return rows


def timed_simulate(preset: str, overrides: list[str], out: Path) -> tuple[dict, dict]:
    """:func:`dp_vs_nodp.simulate` through ``exchange_timer.py``: the summary and the timings."""
    timings = out.with_name(out.name + "-timings.json")
    summary = simulate(preset, overrides, out, runner=[str(TIMER), str(timings)])
    return summary, json.loads(timings.read_text())


def later_median(values: list[float]) -> float | None:
    """The median without the first round's value (which includes start-up), None if empty."""
    later = values[1:] or values
    return statistics.median(later) if later else None


def breakdown(secure: dict, plain: dict, plain_round_s: float) -> dict:
    """Median seconds of each exchange and SecAgg+ stage (rounds after the first) and the floor
    ratio (see the module doc)."""
    def exchanges(timings: dict, name: str) -> float | None:
        rounds = sorted(timings["exchanges"], key=int)
        return later_median([timings["exchanges"][r][name] for r in rounds if name in timings["exchanges"][r]])

    out = {"plain_train_exchange_s": exchanges(plain, "train"),
           "secagg_exchange_s": {stage: exchanges(secure, stage) for stage in STAGES},
           "secagg_stage_s": {stage: later_median(secure["stages"].get(stage, [])) for stage in STAGES}}
    unmask = out["secagg_exchange_s"]["unmask"]
    out["floor_ratio"] = None if unmask is None else (plain_round_s + 3 * unmask) / plain_round_s
    return out


def utility(tmp: Path, rounds: int) -> list[dict]:
    rows = []
    for federation in FEDERATIONS:
        for name, settings in UTILITY.items():
            summary = simulate(federation, [f"run.rounds={rounds}", *settings],
                               tmp / f"{federation}-{name.replace(' ', '-')}")
            rows.append(_utility_row(federation, name, summary))
            print(f"  {federation}, {name}: accuracy {summary['final_accuracy']:.3f}", flush=True)
    return rows


def _utility_row(federation: str, name: str, summary: dict) -> dict:
    privacy = summary["privacy"]
    return {
        "federation": federation, "run": name, "final_accuracy": summary["final_accuracy"],
        "record_epsilon": privacy["record_level"]["max_epsilon"],
        "user_epsilon": privacy["user_level"]["epsilon"], "delta": privacy["delta"],
    }


def overhead_table(rows: list[dict]) -> str:
    lines = ["| model | parameters | clients | round with SecAgg+ (s) | round without (s) | ratio | "
             "overhead per client (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['clients']} | {r['round_s_secagg']:.2f} | "
                     f"{r['round_s_plain']:.2f} | {r['ratio']:.2f} | {r['overhead_per_client_s']:.3f} |")
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    """Where each SecAgg+ round's time goes, beside the plain round's training exchange."""
    lines = ["| model | clients | plain: training exchange (s) | setup (s) | key sharing (s) | "
             "training and masking (s) | unmasking (s) | server's own work in the four stages (s) | "
             "floor ratio | measured ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        if "secagg_exchange_s" not in r:
            continue
        ex, st = r["secagg_exchange_s"], r["secagg_stage_s"]
        own = (None if any(ex[s] is None or st[s] is None for s in STAGES)
               else sum(st[s] - ex[s] for s in STAGES))
        floor = "-" if r["floor_ratio"] is None else f"{r['floor_ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['clients']} | {fmt(r['plain_train_exchange_s'])} | "
                     + " | ".join(fmt(ex[s]) for s in STAGES) + f" | {fmt(own)} | {floor} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def utility_table(rows: list[dict]) -> str:
    lines = ["| federation | privacy | final accuracy | record-level epsilon (max) | user-level epsilon |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['federation']} | {r['run']} | {r['final_accuracy']:.4f} | "
                     f"{fmt(r['record_epsilon'])} | {fmt(r['user_epsilon'])} |")
    return "\n".join(lines)


def growth(rows: list[dict], model: str) -> dict | None:
    """How SecAgg+ overhead grows with clients: per-client overhead at the most vs fewest clients
    (about 1 for linear growth, about n_max / n_min for quadratic)."""
    mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["clients"])
    if len(mine) < 2 or mine[0]["overhead_per_client_s"] <= 0:
        return None
    low, high = mine[0], mine[-1]
    return {"model": model, "clients": [low["clients"], high["clients"]],
            "per_client_growth": high["overhead_per_client_s"] / low["overhead_per_client_s"],
            "quadratic_would_be": high["clients"] / low["clients"]}


def plot(over: list[dict], util: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (1 if over else 0) + (1 if util else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=110, squeeze=False)
    axes = list(axes[0])
    if over:
        ax = axes.pop(0)
        for model, color in zip(MODELS, ("tab:blue", "tab:green", "tab:red")):
            rows = [r for r in over if r["model"] == model]
            n = [r["clients"] for r in rows]
            ax.plot(n, [r["round_s_secagg"] for r in rows], "o-", color=color, label=f"{model} with SecAgg+")
            ax.plot(n, [r["round_s_plain"] for r in rows], "s--", color=color, label=f"{model} without")
        ax.set_xlabel("clients per round")
        ax.set_ylabel("round wall time (s)")
        ax.set_title("SecAgg+ round time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if util:
        ax = axes.pop(0)
        markers = {"quickstart": "o", "cross-device": "^"}
        for r in util:
            eps = [e for e in (r["record_epsilon"], r["user_epsilon"]) if e is not None]
            x = max(eps) if eps else 0.0
            federation = r["federation"]
            ax.scatter([x], [r["final_accuracy"]], s=50, marker=markers.get(federation, "o"))
            ax.annotate(f"{federation}: {r['run']}", (x, r["final_accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("epsilon (largest of record- and user-level; 0 = no DP)")
        ax.set_ylabel("final accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("accuracy vs epsilon (delta 1e-5)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("overhead", "utility", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and clients (a smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    over, util = [], []
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
        if args.part in ("overhead", "all"):
            print("overhead (with vs without SecAgg+):", flush=True)
            over = overhead(Path(tmp), 2 if args.quick else 4, (10,) if args.quick else CLIENTS)
        if args.part in ("utility", "all"):
            print("utility (quickstart and cross-device):", flush=True)
            util = utility(Path(tmp), 2 if args.quick else 20)
    suffix = "-quick" if args.quick else ""
    previous = RESULTS / f"secagg{suffix}.json"
    kept_note = ""
    if args.part != "all" and previous.exists():  # keep the other part's latest measurement
        kept = json.loads(previous.read_text())
        kept_part = "overhead" if args.part == "utility" else "utility"
        if kept.get(kept_part):
            kept_note = (" The " + ("table of accuracy against epsilon is" if kept_part == "utility"
                                    else "overhead tables are") + " from an earlier run (this one ran the other part only).")
        over = over or kept.get("overhead", [])
        util = util or kept.get("utility", [])
    report, met = [], True
    if over:
        target_rows = [r for r in over if r["clients"] == TARGET_CLIENTS]
        ratio_met = bool(target_rows) and all(r["ratio"] <= TARGET_RATIO for r in target_rows)
        growths = [g for g in (growth(over, m) for m in MODELS) if g]
        linear = all(g["per_client_growth"] < 0.5 * g["quadratic_would_be"] for g in growths)
        met = met and ratio_met and linear
        lines = [overhead_table(over), ""]
        for row in target_rows:
            lines.append(f"SecAgg+/plain at {TARGET_CLIENTS} clients, {row['model']}: {row['ratio']:.2f} "
                         f"(target <= {TARGET_RATIO}: {'met' if row['ratio'] <= TARGET_RATIO else 'MISSED'})")
        for g in growths:
            lines.append(f"{g['model']}: overhead per client grows {g['per_client_growth']:.2f}x from "
                         f"{g['clients'][0]} to {g['clients'][1]} clients (quadratic growth would be "
                         f"{g['quadratic_would_be']:.0f}x): {'roughly linear' if g['per_client_growth'] < 0.5 * g['quadratic_would_be'] else 'SUPERLINEAR'}")
        report.append("## Round time with and without SecAgg+\n\n" + "\n".join(lines))
        if any("secagg_exchange_s" in r for r in over):
            report.append(
                "## Where a SecAgg+ round's time goes\n\nMedian seconds per round (rounds after the first) of "
                "each message exchange: the plain round's one, and SecAgg+'s four; the server's own work is "
                "what its four stages took beyond their exchanges. Floor ratio: the plain round plus three "
                "exchanges at the unmasking exchange's time, whose clients only return key shares they "
                "hold: what SecAgg+ would cost if all its computation took no time.\n\n"
                + breakdown_table(over))
    if util:
        report.append("## Accuracy against epsilon (built-in data, seed 42, delta 1e-5)\n\n" + utility_table(util))
    text = "\n\n".join(report) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"overhead": over, "utility": util, "target_met": met, "machine": machine()}
    (RESULTS / f"secagg{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"secagg{suffix}.md").write_text(
        f"# SecAgg+ overhead and utility\n\nMeasured side by side in one run on {payload['machine']['cpus']} "
        f"CPUs ({payload['machine']['platform']}).{kept_note} Plot: secagg{suffix}.png.\n\n{text}")
    plot(over, util, RESULTS / f"secagg{suffix}.png")
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
