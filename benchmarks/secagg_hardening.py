"""What fedpriv's SecAgg+ hardening costs: one round of stock Flower 1.42 SecAgg+ against fedpriv's.

Stock: Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` with Flower's own mask generator.
fedpriv: the same protocol with the ChaCha20 mask generator (common.secagg_masks), the signed
roster and key advertisements (common.roster), and every node's checks on the server
(clients.secagg_guard, inside fedpriv's SecAgg+ mod, which also checks each node's own update).

Both run in one process over an in-memory grid (tests/secagg_protocol.py), every node in turn, on
updates of the size of the demo CNN (93,322 parameters), with 5 shares (threshold 3), at 10 and
50 clients. Local training is left out, so the ratio is the protocol's alone: in a real round,
where each node also trains, the relative cost is smaller. The variants alternate, and each
figure is the median of the repetitions after a warm-up round.

    uv run python benchmarks/secagg_hardening.py [--quick] [--out DIR]

Writes secagg_hardening.json and .md under benchmarks/results/ (target: at most 1.1x).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from dp_vs_nodp import RESULTS, machine  # noqa: E402

DIMENSION = 93_322  # the demo CNN's parameters
SHARES, THRESHOLD = 5, 3
TARGET = 1.1


def _generator(stock: bool) -> None:
    from flwr.common.secure_aggregation import secaggplus_utils

    from common import secagg_masks

    for name in secagg_masks.FLOWER_CALLERS:
        importlib.import_module(name).pseudo_rand_gen = (
            secaggplus_utils.pseudo_rand_gen if stock else secagg_masks.expand_masks)


def one_round(variant: str, clients: int, root: Path) -> float:
    from flwr.server.workflow import SecAggPlusWorkflow

    from clients.mods import make_secure_aggregation_mod
    from common.config import load_config
    from server.secagg_workflow import FedprivSecAggPlusWorkflow, federation_roster
    from tests.secagg_protocol import make_nodes, run_round, stock_mod

    rng = np.random.default_rng(clients)
    split = [DIMENSION // 2, DIMENSION - DIMENSION // 2]
    updates = [[rng.uniform(-0.1, 0.1, n) for n in split] for _ in range(clients)]
    model = [np.zeros(n) for n in split]
    settings = dict(num_shares=SHARES, reconstruction_threshold=THRESHOLD, max_weight=1.0, clipping_range=8.0,
                    quantization_range=2**20, modulus_range=2**32, timeout=60)
    cfg = load_config(overrides=[
        f"run.out_dir={root / f'{variant}-{clients}'}", f"federation.num_clients={clients}",
        "federation.fraction_train=1.0", f"federation.min_train_clients={clients}",
        f"federation.min_available_clients={clients}", f"secure_aggregation.num_shares={SHARES}",
        f"secure_aggregation.reconstruction_threshold={THRESHOLD}"])
    if variant == "stock":
        _generator(stock=True)
        nodes, workflow = make_nodes(updates, stock_mod), SecAggPlusWorkflow(**settings)
    else:
        _generator(stock=False)
        nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
        workflow = FedprivSecAggPlusWorkflow(roster=federation_roster(cfg), **settings)
    start = time.perf_counter()
    strategy, grid = run_round(workflow, nodes, model)
    seconds = time.perf_counter() - start
    if strategy.aggregate is None or grid.refusals:
        raise SystemExit(f"{variant} round with {clients} clients failed: {grid.refusals}")
    _generator(stock=False)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions at 10 clients only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    sizes, repetitions = ([10], 2) if args.quick else ([10, 50], 7)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in sizes:
            times: dict[str, list[float]] = {"stock": [], "fedpriv": []}
            for variant in ("stock", "fedpriv"):
                one_round(variant, clients, Path(tmp))  # warm-up (keys, imports, caches)
            for _ in range(repetitions):
                for variant in ("stock", "fedpriv"):
                    times[variant].append(one_round(variant, clients, Path(tmp)))
            stock, ours = statistics.median(times["stock"]), statistics.median(times["fedpriv"])
            rows.append({"clients": clients, "stock_s": stock, "fedpriv_s": ours, "ratio": ours / stock,
                         "stock_all_s": times["stock"], "fedpriv_all_s": times["fedpriv"],
                         "met": ours / stock <= TARGET})
            print(f"{clients} clients: stock {stock:.3f} s, fedpriv {ours:.3f} s, ratio {ours / stock:.2f}x",
                  flush=True)
    result = {"machine": machine(), "dimension": DIMENSION, "num_shares": SHARES, "threshold": THRESHOLD,
              "repetitions": repetitions, "target_ratio": TARGET, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg_hardening.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# SecAgg+ hardening: one round, fedpriv against stock Flower 1.42", "",
             f"Updates of {DIMENSION:,} parameters, {SHARES} shares (threshold {THRESHOLD}), every node in one "
             f"process, no local training; median of {repetitions} alternated rounds.", "",
             "| clients | stock (s) | fedpriv (s) | ratio | target <= 1.1x |", "|---:|---:|---:|---:|:---:|"]
    lines += [f"| {r['clients']} | {r['stock_s']:.3f} | {r['fedpriv_s']:.3f} | {r['ratio']:.2f}x | "
              f"{'met' if r['met'] else 'NOT met'} |" for r in rows]
    (args.out / "secagg_hardening.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
