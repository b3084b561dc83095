"""``fedpriv privacy``: epsilon for DP-SGD and DP-FedAvg settings, or the noise for a target.

Both accountants of dp-accounting are reported: RDP (used for enforcement: a valid upper bound
that never needs a discretisation choice) and PLD (tighter). Where an accountant cannot analyse
a mechanism -- PLD with fixed-size sampling without replacement -- its figure is null, not a guess.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable

from fedpriv.common import accounting
from fedpriv.common.accounting import ENFORCEMENT_ACCOUNTANT
from fedpriv.common.errors import FedprivError
from fedpriv.common.lazy import lazy_import

# Loaded on first use: every fedpriv command builds this command's parser, and dp-accounting's
# import (scipy) is about 2.5 s of CPU that only the calculator needs.
dp_accounting = lazy_import("dp_accounting")


def add_parser(sub: Any) -> None:
    privacy = sub.add_parser(
        "privacy", help="privacy calculator: epsilon for DP-SGD or DP-FedAvg settings",
        description=__doc__.splitlines()[0],
    )
    kinds = privacy.add_subparsers(dest="mechanism", metavar="MECHANISM", required=True)

    dpsgd = kinds.add_parser(
        "dpsgd", help="record-level DP-SGD on one dataset",
        description="Record-level epsilon of DP-SGD with Poisson-sampled batches "
                    "(q = batch/examples), plus the conservative figure without amplification.",
    )
    dpsgd.add_argument("--examples", type=int, required=True, help="records in the dataset (N)")
    dpsgd.add_argument("--batch-size", type=int, required=True, help="expected batch size (B)")
    dpsgd.add_argument("--epochs", type=int, required=True,
                       help="epochs, a whole number as in the trainer (steps = E*ceil(N/B), the trainer's schedule)")
    dpsgd.add_argument("--microbatches", type=int, default=0,
                       help="microbatches per batch (0: one per example); doubles the sensitivity")
    _common_arguments(dpsgd)
    dpsgd.set_defaults(func=cmd_dpsgd)

    fedavg = kinds.add_parser(
        "dpfedavg", help="user-level DP-FedAvg over a client population",
        description="User-level epsilon of DP-FedAvg: clipped client updates summed with "
                    "Gaussian noise, clients sampled each round.",
    )
    fedavg.add_argument("--population", type=int, required=True, help="clients in the population")
    fedavg.add_argument("--clients-per-round", type=int, required=True,
                        help="clients per round (expected number, with Poisson sampling)")
    fedavg.add_argument("--rounds", type=int, required=True, help="rounds (T)")
    fedavg.add_argument("--sampling", choices=accounting.SAMPLING_SCHEMES, default="poisson",
                        help="poisson (default), fixed (without replacement), none (no amplification)")
    _common_arguments(fedavg)
    fedavg.set_defaults(func=cmd_dpfedavg)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--noise", type=float, help="noise multiplier z (std / clipping norm)")
    target.add_argument("--target-epsilon", type=float, help="print the noise multiplier needed instead")
    parser.add_argument("--delta", type=float, required=True, help="target delta, in (0, 1)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FedprivError(message)


def _check_common(args: argparse.Namespace) -> None:
    _check(math.isfinite(args.delta) and 0 < args.delta < 1, f"--delta must be in (0, 1), got {args.delta}")
    if args.noise is not None:
        _check(math.isfinite(args.noise) and args.noise >= 0, f"--noise must be >= 0, got {args.noise}")
    if args.target_epsilon is not None:
        _check(math.isfinite(args.target_epsilon) and args.target_epsilon > 0,
               f"--target-epsilon must be > 0, got {args.target_epsilon}")


def _solve(make_event: Callable[[float], dp_accounting.DpEvent], target: float, delta: float,
           sampling: str) -> dict[str, Any]:
    noise: dict[str, Any] = {}
    for name in accounting.ACCOUNTANTS:  # RDP first: its answer bounds the search for PLD's
        if not accounting.analysable(make_event(1.0), name, sampling):
            noise[name] = None
            continue
        noise[name] = accounting.noise_for_target_epsilon(
            make_event, target, delta, name, sampling, upper_bound=noise.get("rdp"))
    return noise


def cmd_dpsgd(args: argparse.Namespace) -> int:
    _check_common(args)
    _check(args.examples > 0, f"--examples must be > 0, got {args.examples}")
    _check(0 < args.batch_size <= args.examples, "--batch-size must be between 1 and --examples")
    _check(args.epochs > 0, f"--epochs must be > 0, got {args.epochs}")
    _check(0 <= args.microbatches <= args.batch_size, "--microbatches must be between 0 and --batch-size")
    if args.delta >= 1 / args.examples:
        _warn(f"delta {args.delta:g} >= 1/examples ({1 / args.examples:.3g}): such a guarantee "
              "allows leaking a whole record outright")

    def make_event(z: float) -> dp_accounting.DpEvent:
        return accounting.dpsgd_event(args.examples, args.batch_size, args.epochs, z, args.microbatches)

    sampling_probability, steps = accounting.dpsgd_schedule(args.examples, args.batch_size, args.epochs)
    report: dict[str, Any] = {
        "mechanism": "dpsgd",
        "level": "record",
        "examples": args.examples,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "steps": steps,
        "sampling_probability": sampling_probability,
        "microbatches": args.microbatches,
        "delta": args.delta,
        "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
    }
    if args.target_epsilon is not None:
        report["target_epsilon"] = args.target_epsilon
        report["noise_multiplier"] = _solve(make_event, args.target_epsilon, args.delta, "poisson")
    else:
        report["noise_multiplier"] = args.noise
        report["effective_noise_multiplier"] = accounting.effective_noise_multiplier(
            args.noise, args.microbatches, args.batch_size)
        report["epsilon"] = accounting.figures(make_event(args.noise), args.delta, "poisson")
        report["epsilon_without_amplification"] = accounting.dpsgd_shuffle_epsilon(
            args.examples, args.batch_size, args.epochs, args.noise, args.delta, args.microbatches)
    return _emit(report, args.json)


def cmd_dpfedavg(args: argparse.Namespace) -> int:
    _check_common(args)
    _check(args.population > 0, f"--population must be > 0, got {args.population}")
    _check(0 < args.clients_per_round <= args.population,
           "--clients-per-round must be between 1 and --population")
    _check(args.rounds > 0, f"--rounds must be > 0, got {args.rounds}")
    if args.delta >= 1 / args.population:
        _warn(f"delta {args.delta:g} >= 1/population ({1 / args.population:.3g}): such a guarantee "
              "allows leaking one client's data outright")

    def make_event(z: float) -> dp_accounting.DpEvent:
        one_round = accounting.dpfedavg_round_event(z, args.population, args.clients_per_round, args.sampling)
        return dp_accounting.SelfComposedDpEvent(one_round, args.rounds)

    report: dict[str, Any] = {
        "mechanism": "dpfedavg",
        "level": "user",
        "population": args.population,
        "clients_per_round": args.clients_per_round,
        "rounds": args.rounds,
        "sampling": args.sampling,
        "neighboring_relation": accounting.neighboring_relation(args.sampling).name.lower(),
        "delta": args.delta,
        "enforcement_accountant": ENFORCEMENT_ACCOUNTANT,
    }
    if args.target_epsilon is not None:
        report["target_epsilon"] = args.target_epsilon
        report["noise_multiplier"] = _solve(make_event, args.target_epsilon, args.delta, args.sampling)
    else:
        report["noise_multiplier"] = args.noise
        report["epsilon"] = accounting.figures(make_event(args.noise), args.delta, args.sampling)
    return _emit(report, args.json)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _number(value: Any) -> str:
    if value is None:
        return "n/a (not supported by this accountant)"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def _emit(report: dict[str, Any], as_json: bool) -> int:
    from fedpriv.common.fileio import json_safe

    if as_json:
        print(json.dumps(json_safe(report), indent=2))
        return 0
    level = report["level"]
    if "target_epsilon" in report:
        print(f"{level}-level noise multiplier for epsilon {report['target_epsilon']:g} "
              f"at delta {report['delta']:g}:")
        for name, value in report["noise_multiplier"].items():
            print(f"  {name.upper():<4} {_number(value)}")
    else:
        print(f"{level}-level epsilon at delta {report['delta']:g} "
              f"(noise multiplier {report['noise_multiplier']:g}):")
        for name, value in report["epsilon"].items():
            marker = "  (used for enforcement)" if name == report["enforcement_accountant"] else ""
            print(f"  {name.upper():<4} {_number(value)}{marker}")
        if "epsilon_without_amplification" in report:
            print(f"  without sampling amplification (each record once per epoch): "
                  f"{_number(report['epsilon_without_amplification'])}")
    return 0
