"""What fedpriv's SecAgg+ hardening costs: one round of stock Flower 1.42 SecAgg+ against fedpriv's.

Stock: Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` with Flower's own mask generator.
fedpriv: the same protocol with the ChaCha20 mask generator (common.secagg_masks), the signed
roster and key advertisements (common.roster), and every node's checks on the server
(clients.secagg_guard, inside fedpriv's SecAgg+ mod, which also checks each node's own update).

Both run in one process over an in-memory grid (tests/secagg_protocol.py), every node in turn, on
updates of the size of the demo CNN (93,322 parameters), with 5 shares (threshold 3), at 10 and
50 clients, two ways:

- **protocol only**: each node replies with a fixed update, so the ratio is the protocol's alone
  (the worst case for the hardening);
- **round**: each node first trains the demo CNN with DP-SGD on its partition of the built-in data
  (the quickstart's local step, 1 epoch), as in a real round.

The variants alternate, and each figure is the median of the repetitions after a warm-up round.

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

    from fedpriv.common import secagg_masks

    for name in secagg_masks.FLOWER_CALLERS:
        importlib.import_module(name).pseudo_rand_gen = (
            secaggplus_utils.pseudo_rand_gen if stock else secagg_masks.expand_masks)


def local_training(cfg, clients: int):
    """For each node, a function that runs its quickstart DP-SGD step and returns its update."""
    from fedpriv.clients.app import local_data
    from fedpriv.clients.trainer import get_trainer
    from fedpriv.common.data import load_dataset
    from fedpriv.common.models import resolve_model_name

    dataset = load_dataset(cfg.data, cfg.run.seed)
    trainer = get_trainer(resolve_model_name(cfg.model, dataset.input_shape), cfg.model, cfg.client, cfg.dp,
                          dataset.input_shape, dataset.num_classes)
    start = [np.asarray(w) for w in trainer.model.get_weights()]

    def train(partition: int):
        x, y = local_data(cfg, partition)
        result = trainer.train(start, x, y, cfg.schedule_examples(len(dataset.y_train)))
        return [np.asarray(t, dtype=np.float64) - s for s, t in zip(start, result.weights, strict=True)]

    return start, [lambda i=i: train(i) for i in range(clients)]


def one_round(variant: str, clients: int, root: Path, train: bool = False) -> float:
    from flwr.server.workflow import SecAggPlusWorkflow

    from fedpriv.clients.mods import make_secure_aggregation_mod
    from fedpriv.common.config import load_config
    from fedpriv.server.secagg_workflow import FedprivSecAggPlusWorkflow, federation_roster
    from tests.secagg_protocol import make_nodes, run_round, stock_mod

    settings = dict(num_shares=SHARES, reconstruction_threshold=THRESHOLD, max_weight=1.0, clipping_range=8.0,
                    quantization_range=2**20, modulus_range=2**32, timeout=60)
    cfg = load_config(overrides=[
        f"run.out_dir={root / f'{variant}-{clients}'}", f"federation.num_clients={clients}",
        "federation.fraction_train=1.0", f"federation.min_train_clients={clients}",
        f"federation.min_available_clients={clients}", f"secure_aggregation.num_shares={SHARES}",
        f"secure_aggregation.reconstruction_threshold={THRESHOLD}"])
    if train:
        model, updates = local_training(cfg, clients)
    else:
        rng = np.random.default_rng(clients)
        split = [DIMENSION // 2, DIMENSION - DIMENSION // 2]
        updates = [[rng.uniform(-0.1, 0.1, n) for n in split] for _ in range(clients)]
        model = [np.zeros(n) for n in split]
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
    parser.add_argument("--quick", action="store_true", help="10 clients only, 2 protocol rounds and 1 trained")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    plan = [("protocol only", False, 2 if args.quick else 7), ("round", True, 1 if args.quick else 3)]
    sizes = [10] if args.quick else [10, 50]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, train, repetitions in plan:
            for clients in sizes:
                times: dict[str, list[float]] = {"stock": [], "fedpriv": []}
                for variant in ("stock", "fedpriv"):
                    one_round(variant, clients, Path(tmp), train)  # warm-up (keys, imports, caches)
                for _ in range(repetitions):
                    for variant in ("stock", "fedpriv"):
                        times[variant].append(one_round(variant, clients, Path(tmp), train))
                stock, ours = statistics.median(times["stock"]), statistics.median(times["fedpriv"])
                rows.append({"kind": kind, "clients": clients, "repetitions": repetitions, "stock_s": stock,
                             "fedpriv_s": ours, "ratio": ours / stock, "stock_all_s": times["stock"],
                             "fedpriv_all_s": times["fedpriv"], "met": ours / stock <= TARGET})
                print(f"{kind}, {clients} clients: stock {stock:.3f} s, fedpriv {ours:.3f} s, "
                      f"ratio {ours / stock:.2f}x", flush=True)
    result = {"machine": machine(), "dimension": DIMENSION, "num_shares": SHARES, "threshold": THRESHOLD,
              "target_ratio": TARGET, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg_hardening.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# SecAgg+ hardening: one round, fedpriv against stock Flower 1.42", "",
             f"Updates of {DIMENSION:,} parameters, {SHARES} shares (threshold {THRESHOLD}), every node in one "
             "process; medians of alternated rounds. *Protocol only*: fixed updates, no training (the "
             "hardening's worst case). *Round*: each node first trains the demo CNN with DP-SGD on its "
             "partition, as in a real round.", "",
             "| rounds | clients | repetitions | stock (s) | fedpriv (s) | ratio | target <= 1.1x |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    lines += [f"| {r['kind']} | {r['clients']} | {r['repetitions']} | {r['stock_s']:.3f} | {r['fedpriv_s']:.3f} | "
              f"{r['ratio']:.2f}x | {'met' if r['met'] else 'NOT met'} |" for r in rows]
    (args.out / "secagg_hardening.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
