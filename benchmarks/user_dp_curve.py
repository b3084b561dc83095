"""Utility of user-level DP: the cross-device preset's final accuracy against user-level epsilon.

For each target user-level epsilon (default 1, 2, 4, 8 at the preset's delta), this finds the
smallest user-level noise multiplier whose DP-FedAvg rounds (the preset's population, Poisson
client sampling and rounds; dp-accounting's RDP accountant, fedpriv's enforcement accountant) stay
within it, runs ``fedpriv simulate --preset cross-device`` with that noise, and records the final
accuracy and the epsilon the run's own ledger reports. A run with user-level DP off gives the
no-DP line. Each configuration runs ``--repeats`` times, one after the other (training draws from
the OS, so accuracies vary). Results: benchmarks/results/user_dp_curve.{json,md,png}.

With ``--as-shipped N`` it instead runs the preset exactly as shipped (its own noise multiplier)
N times beside runs without user-level DP (``--no-dp-runs K``, default N), and checks the preset's target: mean final accuracy
at least 0.85 at a user-level epsilon of at most 3. Results: benchmarks/results/user_dp_preset.{json,md}.

    uv run python benchmarks/user_dp_curve.py [--epsilons 1,2,4,8] [--repeats N] [--set key=value ...]
    uv run python benchmarks/user_dp_curve.py --as-shipped 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from dp_vs_nodp import RESULTS, machine, simulate  # noqa: E402

PRESET = "cross-device"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
TARGET_ACCURACY, TARGET_EPSILON = 0.85, 3.0  # the preset as shipped (issue: user-level DP worth using)


def noise_for(cfg, epsilon: float) -> float:
    """The smallest user-level noise multiplier keeping the preset's rounds within ``epsilon``."""
    from fedpriv.common import accounting

    fed = cfg.federation
    expected = fed.fraction_train * fed.num_clients

    def make_event(z: float):
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(
            accounting.dpfedavg_round_event(z, fed.num_clients, expected, "poisson"), cfg.run.rounds)

    return accounting.noise_for_target_epsilon(make_event, epsilon, cfg.privacy.delta)


def run(overrides: list[str], out: Path) -> dict:
    summary = simulate(PRESET, overrides, out)
    user = summary["privacy"].get("user_level") or {}
    return {"final_accuracy": summary["final_accuracy"], "user_epsilon": user.get("epsilon"),
            "wall_time_s": summary["_wall_s"]}


def plot(rows: list[dict], no_dp: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["target_epsilon"] for r in rows]
    ax.plot(xs, [r["accuracy_mean"] for r in rows], "o-", label="user-level DP (DP-FedAvg)")
    for r in rows:
        ax.plot([r["target_epsilon"]] * len(r["accuracies"]), r["accuracies"], ".", color="gray")
    ax.axhline(no_dp, linestyle="--", color="black", label=f"no DP ({no_dp:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("user-level epsilon (delta 1e-5)")
    ax.set_ylabel("final accuracy")
    ax.set_title("cross-device preset: accuracy against user-level epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def as_shipped(repeats: int, overrides: list[str], out: Path, no_dp_runs: int) -> int:
    """The preset as shipped, ``repeats`` runs, beside ``no_dp_runs`` without user-level DP."""
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-user-dp-") as tmp:
        private, plain = [], []
        for i in range(repeats):  # interleaved, so machine noise hits both alike
            private.append(run(overrides, Path(tmp) / f"dp-{i}"))
            print(f"run {i + 1}: user-level DP {private[-1]['final_accuracy']:.4f} (epsilon "
                  f"{private[-1]['user_epsilon']:.3f})", flush=True)
            if i < no_dp_runs:
                plain.append(run([*overrides, "user_dp.enabled=false"], Path(tmp) / f"nodp-{i}"))
                print(f"run {i + 1}: no DP {plain[-1]['final_accuracy']:.4f}", flush=True)
    from fedpriv.common.config import load_config
    from fedpriv.common.presets import preset_layers

    cfg = load_config(preset_layers(PRESET), overrides)
    accuracy = statistics.mean(r["final_accuracy"] for r in private)
    epsilon = max(r["user_epsilon"] for r in private)
    met = accuracy >= TARGET_ACCURACY and epsilon <= TARGET_EPSILON
    payload = {
        "preset": PRESET, "overrides": overrides, "repeats": repeats, "delta": cfg.privacy.delta,
        "settings": {"noise_multiplier": cfg.user_dp.noise_multiplier, "clipping_norm": cfg.user_dp.clipping_norm,
                     "adaptive_clipping": cfg.user_dp.adaptive_clipping, "rounds": cfg.run.rounds,
                     "fraction_train": cfg.federation.fraction_train, "num_clients": cfg.federation.num_clients,
                     "local_epochs": cfg.client.local_epochs, "learning_rate": cfg.client.learning_rate},
        "accuracy_mean": accuracy, "accuracies": [r["final_accuracy"] for r in private],
        "user_epsilon": [r["user_epsilon"] for r in private],
        "no_dp_accuracy_mean": statistics.mean(r["final_accuracy"] for r in plain),
        "no_dp_accuracies": [r["final_accuracy"] for r in plain],
        "target": {"accuracy": TARGET_ACCURACY, "epsilon": TARGET_EPSILON, "met": met},
        "wall_time_s": [r["wall_time_s"] for r in private + plain], "machine": machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "user_dp_preset.json").write_text(json.dumps(payload, indent=2) + "\n")
    s = payload["settings"]
    lines = [
        "# User-level DP: the cross-device preset as shipped",
        "",
        f"`benchmarks/user_dp_curve.py --as-shipped {repeats}` on {payload['machine']['cpus']} CPUs: the preset "
        f"({s['num_clients']:,} devices, about {s['fraction_train'] * s['num_clients']:g} a round, {s['rounds']} rounds, "
        f"{s['local_epochs']} local epochs, clip {s['clipping_norm']:g}, noise multiplier {s['noise_multiplier']:g}"
        f"{', adaptive clipping' if s['adaptive_clipping'] else ''}"
        f"{', with ' + ' '.join(overrides) if overrides else ''}) {repeats} times, and {len(plain)} time(s) without "
        f"user-level DP (interleaved). Epsilon: the run's ledger (RDP, delta {cfg.privacy.delta:g}).",
        "",
        "| run | final accuracy, mean | runs | user-level epsilon |",
        "|---|---:|---|---:|",
        f"| user-level DP | {accuracy:.4f} | {', '.join(f'{a:.4f}' for a in payload['accuracies'])} | {epsilon:.3f} |",
        f"| no DP | {payload['no_dp_accuracy_mean']:.4f} | "
        f"{', '.join(f'{a:.4f}' for a in payload['no_dp_accuracies'])} | - |",
        "",
        f"Target: mean accuracy at least {TARGET_ACCURACY} at user-level epsilon at most {TARGET_EPSILON:g}: "
        f"{'met' if met else 'MISSED'}.",
        "",
    ]
    (out / "user_dp_preset.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                        help="target user-level epsilons, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--as-shipped", type=int, default=0, metavar="N",
                        help="run the preset as shipped N times beside runs without user-level DP, instead of the curve")
    parser.add_argument("--no-dp-runs", type=int, default=0, metavar="K",
                        help="with --as-shipped: runs without user-level DP (default N)")
    args = parser.parse_args()
    if args.as_shipped:
        return as_shipped(args.as_shipped, args.overrides, args.out, min(args.no_dp_runs or args.as_shipped,
                                                                         args.as_shipped))
    try:
        targets = [float(e) for e in args.epsilons.split(",")]
    except ValueError:
        sys.exit(f"error: --epsilons must be numbers separated by commas, got {args.epsilons!r}")
    if args.repeats < 1 or not targets or min(targets) <= 0:
        sys.exit("error: --repeats must be at least 1 and every epsilon positive")
    from fedpriv.common.config import load_config
    from fedpriv.common.presets import preset_layers

    cfg = load_config(preset_layers(PRESET), args.overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-user-dp-") as tmp:
        runs = [run([*args.overrides, "user_dp.enabled=false"], Path(tmp) / f"nodp-{i}") for i in range(args.repeats)]
        no_dp = statistics.mean(r["final_accuracy"] for r in runs)
        print(f"no DP: accuracy {no_dp:.4f}", flush=True)
        for target in targets:
            z = noise_for(cfg, target)
            results = [run([*args.overrides, f"user_dp.noise_multiplier={z:.6g}"], Path(tmp) / f"eps{target:g}-{i}")
                       for i in range(args.repeats)]
            accuracies = [r["final_accuracy"] for r in results]
            rows.append({"target_epsilon": target, "noise_multiplier": z,
                         "user_epsilon": [r["user_epsilon"] for r in results], "accuracies": accuracies,
                         "accuracy_mean": statistics.mean(accuracies),
                         "wall_time_s": [r["wall_time_s"] for r in results]})
            print(f"epsilon {target:g}: z {z:.4f}, accuracy {statistics.mean(accuracies):.4f} "
                  f"(ledger epsilon {results[0]['user_epsilon']})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"preset": PRESET, "overrides": args.overrides, "repeats": args.repeats, "no_dp_accuracy": no_dp,
               "no_dp_accuracies": [r["final_accuracy"] for r in runs], "rows": rows,
               "delta": cfg.privacy.delta, "machine": machine()}
    (args.out / "user_dp_curve.json").write_text(json.dumps(payload, indent=2) + "\n")
    no_dp_runs = ", ".join(f"{r['final_accuracy']:.4f}" for r in runs)
    lines = [
        "# User-level DP: accuracy against epsilon (cross-device preset)",
        "",
        f"`benchmarks/user_dp_curve.py`, {args.repeats} run(s) per point, {payload['machine']['cpus']} CPUs; "
        f"settings: the preset{' with ' + ' '.join(args.overrides) if args.overrides else ''}. The noise multiplier "
        f"is the smallest whose {cfg.run.rounds} Poisson-sampled DP-FedAvg rounds stay within the target "
        f"(dp-accounting RDP, fedpriv's enforcement accountant, delta {cfg.privacy.delta:g}); the epsilon is "
        f"the one the run's ledger records (RDP).",
        "",
        "| user-level epsilon (target) | noise multiplier | epsilon (ledger) | final accuracy (mean) | runs |",
        "|---:|---:|---:|---:|---|",
        f"| no DP | - | - | {no_dp:.4f} | {no_dp_runs} |",
    ]
    for r in rows:
        ledger = r["user_epsilon"][0]
        shown = "-" if ledger is None else f"{ledger:.3f}"
        accuracies = ", ".join(f"{a:.4f}" for a in r["accuracies"])
        lines.append(f"| {r['target_epsilon']:g} | {r['noise_multiplier']:.4f} | {shown} | "
                     f"{r['accuracy_mean']:.4f} | {accuracies} |")
    lines += ["", "![accuracy against user-level epsilon](user_dp_curve.png)", ""]
    (args.out / "user_dp_curve.md").write_text("\n".join(lines))
    plot(rows, no_dp, args.out / "user_dp_curve.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
