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
            times, params = {}, None
            for secure in (True, False):
                out = tmp / f"{model}-{n}-{secure}"
                summary = simulate("quickstart", base + [f"secure_aggregation.enabled={str(secure).lower()}"], out)
                later = [r["seconds"] for r in summary["rounds"][1:] if r["seconds"] is not None]
                times[secure] = statistics.median(later)
                params = summary["model_parameters"]
            row = {"model": model, "parameters": params, "clients": n, "round_s_secagg": times[True],
                   "round_s_plain": times[False], "ratio": times[True] / times[False],
                   "overhead_s": times[True] - times[False]}
            row["overhead_per_client_s"] = row["overhead_s"] / n
            print(f"  {model} x {n} clients: {times[True]:.2f} s vs {times[False]:.2f} s "
                  f"(ratio {row['ratio']:.2f})", flush=True)
            rows.append(row)
    return rows


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
    if args.part != "all" and previous.exists():  # keep the other part's latest measurement
        kept = json.loads(previous.read_text())
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
    if util:
        report.append("## Accuracy against epsilon (built-in data, seed 42, delta 1e-5)\n\n" + utility_table(util))
    text = "\n\n".join(report) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"overhead": over, "utility": util, "target_met": met, "machine": machine()}
    (RESULTS / f"secagg{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"secagg{suffix}.md").write_text(
        f"# SecAgg+ overhead and utility\n\nMeasured side by side in one run on {payload['machine']['cpus']} "
        f"CPUs ({payload['machine']['platform']}). Plot: secagg{suffix}.png.\n\n{text}")
    plot(over, util, RESULTS / f"secagg{suffix}.png")
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
