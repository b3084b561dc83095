"""DP-SGD step cost: local training throughput of each DP-SGD implementation, side by side.

For the seed CNN and the MLP (on 28x28x1 images of the built-in data, 10 classes) and each
batch size, this times the trainer's step (:meth:`clients.trainer.LocalTrainer.step`: the DP noise
generator's reseed from ``os.urandom``, then the model's ``train_step``, traced once for any batch
size) on the same fixed batches for:

- ``nonprivate``: plain Keras SGD (the baseline);
- ``textbook``: TF Privacy's DPKerasSGDOptimizer with one microbatch per example;
- ``vectorized``: TF Privacy's VectorizedDPKerasSGDOptimizer, one microbatch per example;
- ``fast``: TF Privacy's DPSequential with fast clipping (its Dense registry function and
  fedpriv's Conv2D one, clients/conv_clipping.py);
- ``bookkeeping``: fedpriv's book-keeping DP-SGD (clients/bk_clipping.py);
- ``default``: what a fedpriv client runs with ``dp.implementation = "auto"`` (the trainer of the
  variant whose implementation auto picks, timed again under this name, so it is traced once);
- ``clipping_only``: the default implementation with noise multiplier 0: its per-example clipping
  and nothing else, so the default's cost splits into clipping and noise;
- ``noise_draw``: no training at all, only one step's worth of noise drawn the way every DP step
  draws it (:func:`common.entropy.standard_normals`, CSPRNG normals for each trainable weight), on
  the timing thread; its ratio is the share of a non-private step the draw alone costs;
- ``fixed_noise``: the default implementation with the same noise pool refilled every step from
  one fixed tensor instead of fresh draws (not private: a measurement only). It adds the noise in
  the step as the default does, and draws nothing, so the gap between it and ``default`` is what
  drawing costs the step, the prefetch thread's competition for the cores included.

Every variant is built by fedpriv's own :class:`clients.trainer.LocalTrainer`, so the numbers
are those of the code clients run. Each variant is warmed up first (tracing and compilation are
not timed); then the variants are timed in rounds, each round running every variant in a shuffled
order, so machine noise hits all of them alike. Each variant runs at least --steps steps a round,
and cheap ones more, to fill --min-block-s seconds. A variant's ratio is the median over rounds of
its seconds per step divided by the non-private seconds per step of the same round (that is,
non-private throughput / variant throughput): how many times longer its step takes. The textbook
and vectorized optimizers, 15-70x slower and there for reference, are timed in the first three
rounds only. They need memory growing with the square of the batch size; where their estimate
does not fit in the memory free, they are skipped and the reason is recorded.

    uv run python benchmarks/dp_step.py [--quick] [--device cpu|gpu|auto] [--models cnn,mlp]
        [--batch-sizes 64,256] [--steps N] [--rounds N] [--min-block-s S] [--seed N]
        [--no-memory-guard] [--out DIR]

Prints a Markdown table and saves dp_step.json and dp_step.md in --out (default
benchmarks/results; with --quick and no --out, a temporary folder, so a quick run never replaces
the full results). The files are rewritten after each model and batch size (with "complete":
false until the end), so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from dp_vs_nodp import RESULTS, machine  # noqa: E402

VARIANTS = ("nonprivate", "textbook", "vectorized", "fast", "bookkeeping", "default", "clipping_only",
            "fixed_noise", "noise_draw")
# The DPSection.implementation each variant is built with (None: DP off); noise_draw trains nothing.
IMPLEMENTATION = {"nonprivate": None, "textbook": "keras", "vectorized": "vectorized",
                  "fast": "fast", "bookkeeping": "bookkeeping", "default": "auto", "clipping_only": "auto",
                  "fixed_noise": "auto"}
LABELS = {"clipping_only": "clipping only (default, noise multiplier 0)",
          "fixed_noise": "noise from a fixed pool (default, nothing drawn; not private)",
          "noise_draw": "noise draw alone (CSPRNG normals, one step's worth; no training)"}
MODELS = ("cnn", "mlp")
INPUT_SHAPE = (28, 28, 1)  # the built-in data (real MNIST digits)
NUM_CLASSES = 10
DISTINCT_BATCHES = 4  # each block cycles through the same few fixed batches
SEED = 42
# steps: timed steps per variant per round, at least; more for cheap variants, up to max_steps, to
# fill min_block_s seconds. warmup: untimed steps first. reference_rounds: the per-example-jacobian
# variants (textbook and vectorized: 15-70x the non-private step, there for reference, no target on
# them) are timed in the first reference_rounds rounds only; timed in every round, they took about a
# quarter of a full run.
FULL = {"batch_sizes": (64, 256), "steps": 3, "rounds": 8, "reference_rounds": 3, "warmup": 2,
        "min_block_s": 1.0, "max_steps": 400}
# The quick mode (the test suite's) only shows that every variant runs and gives a ratio: one small
# batch size, two rounds of short blocks.
QUICK = {"batch_sizes": (16,), "steps": 1, "rounds": 2, "reference_rounds": 2, "warmup": 1,
         "min_block_s": 0.05, "max_steps": 10}


def select_device(device: str) -> None:
    """Hide the GPUs for ``cpu``; must run before TensorFlow is imported."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def gpu_names(tf: Any) -> list[str]:
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except Exception:  # noqa: BLE001 - details are optional
            names.append(gpu.name)
    return names


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fixed_batches(batch_size: int, seed: int) -> tuple[list[Any], str]:
    """``DISTINCT_BATCHES`` batches of the built-in data (synthetic data of its shape if the
    built-in data cannot be loaded), drawn once with ``seed`` and shared by every variant."""
    import numpy as np

    rng = np.random.default_rng(seed)
    try:
        from fedpriv.common.config import DataSection
        from fedpriv.common.data import load_dataset

        data = load_dataset(DataSection(dataset="builtin"), seed)
        x, y, source = data.x_train.astype(np.float32), data.y_train, "builtin"
        assert x.shape[1:] == INPUT_SHAPE, x.shape
    except Exception as exc:  # noqa: BLE001 - timings only need the right shapes
        print(f"note: built-in data unavailable ({exc}); using synthetic data", file=sys.stderr)
        x = rng.random((batch_size * DISTINCT_BATCHES, *INPUT_SHAPE), dtype=np.float32)
        y, source = rng.integers(0, NUM_CLASSES, len(x)), "synthetic"
    batches = []
    for _ in range(DISTINCT_BATCHES):
        chosen = rng.choice(len(x), size=batch_size, replace=len(x) < batch_size)
        batches.append((x[chosen], y[chosen].astype(np.int64)))
    return batches, source


def build(variant: str, model_name: str, batch_size: int) -> Any:
    """A fedpriv LocalTrainer for ``variant`` (defaults of [model], [client] and [dp] otherwise)."""
    from fedpriv.clients.trainer import LocalTrainer
    from fedpriv.common.config import ClientSection, DPSection, ModelSection

    implementation = IMPLEMENTATION[variant]
    noise = {"noise_multiplier": 0.0} if variant == "clipping_only" else {}
    dp = DPSection(enabled=implementation is not None, microbatches=0,
                   implementation=implementation or "auto", **noise)
    return LocalTrainer(model_name, ModelSection(), ClientSection(batch_size=batch_size, optimizer="sgd"),
                        dp, INPUT_SHAPE, NUM_CLASSES)


# Both TF Privacy optimizers get per-example gradients from ``tape.jacobian`` over the whole batch,
# whose intermediate tensors hold one gradient of every activation per example: memory grows with
# the square of the batch size (measured here: the seed CNN takes about 2.4 GB at batch 64 and
# 7.2 GB at batch 128, so about 30 GB at 256). Such a variant is skipped, with the reason recorded,
# when its estimate exceeds this share of the memory free at the start.
JACOBIAN_IMPLEMENTATIONS = ("keras", "vectorized")
JACOBIAN_BYTES_FACTOR = 3.0  # measured bytes / (batch^2 * activation floats * 4), about 2.6
MEMORY_SHARE = 0.7


class Timer:
    """Runs a trainer's compiled step on the fixed batches and times blocks of steps."""

    def __init__(self, trainer: Any, batches: list[Any], gpu: bool, tf: Any) -> None:
        self.trainer, self.model, self.batches, self.gpu, self.tf = trainer, trainer.model, batches, gpu, tf
        self.implementation = trainer.implementation
        self.step = 0
        self.peak_bytes = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps (each step returns the loss to the host, so the device has
        finished when it returns)."""
        self._memory_stats(reset=True)
        started = time.perf_counter()
        for _ in range(steps):
            x, y = self.batches[self.step % len(self.batches)]
            self.trainer.step(x, y)
            self.step += 1
        elapsed = time.perf_counter() - started
        self._memory_stats(reset=False)
        return elapsed

    def _memory_stats(self, reset: bool) -> None:
        """Reset, or read into ``peak_bytes``, TensorFlow's peak GPU memory (when it has one)."""
        if not self.gpu:
            return
        try:
            if reset:
                self.tf.config.experimental.reset_memory_stats("GPU:0")
            else:
                peak = self.tf.config.experimental.get_memory_info("GPU:0")["peak"]
                self.peak_bytes = max(self.peak_bytes, peak)
        except (ValueError, RuntimeError):  # this TensorFlow keeps no statistics for the device
            self.gpu = False


def draw_nothing(trainer: Any) -> None:
    """Make ``trainer``'s noise pool refill from one fixed tensor of zeros instead of fresh normals
    (the ``fixed_noise`` variant: the step still reads the pool and adds it, and still checks that
    each refill is used once)."""
    import numpy as np

    from fedpriv.common.tf_runtime import tf

    noise, fixed = trainer.noise, {}

    def next_normals() -> Any:
        if noise.size not in fixed:
            fixed[noise.size] = tf().constant(np.zeros(noise.size, np.float32))
        return fixed[noise.size]

    noise._next_normals = next_normals


class DrawTimer:
    """Times :func:`common.entropy.standard_normals` of ``count`` normals (one DP step's noise for
    a model of ``count`` trainable weights), as a Timer times steps."""

    implementation = "csprng-normals"
    peak_bytes = 0

    def __init__(self, count: int) -> None:
        self.count = count

    def run(self, steps: int) -> float:
        from fedpriv.common.entropy import standard_normals

        started = time.perf_counter()
        for _ in range(steps):
            standard_normals(self.count)
        return time.perf_counter() - started


def activation_floats(model: Any) -> int:
    """Floats of one example's input and layer outputs (a built Keras model)."""
    total = math.prod(model.input_shape[1:])
    for layer in model.layers:
        total += math.prod(layer.output_shape[1:])
    return total


def free_memory_bytes(gpu: bool) -> int | None:
    """Memory free now: on the GPU (nvidia-smi), else in RAM (/proc/meminfo); None if unknown."""
    try:
        if gpu:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10)
            return int(smi.stdout.split()[0]) * 2**20
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return None


def too_big(timer: Timer, batch_size: int, free: int | None) -> str | None:
    """Why ``timer``'s variant would not fit in memory, or None."""
    if free is None or timer.implementation not in JACOBIAN_IMPLEMENTATIONS:
        return None
    need = JACOBIAN_BYTES_FACTOR * batch_size**2 * activation_floats(timer.model) * 4
    if need <= MEMORY_SHARE * free:
        return None
    return (f"skipped: per-example jacobian needs about {need / 2**30:.0f} GiB at batch {batch_size} "
            f"(memory grows with batch^2), {free / 2**30:.0f} GiB free")


def measure(model_name: str, batch_size: int, settings: dict, gpu: bool, tf: Any, seed: int,
            memory_guard: bool = True) -> dict:
    """Throughput and ratios of every variant for one model and batch size.

    Each variant runs at least ``settings["steps"]`` steps per round, and more if that is needed to
    fill ``settings["min_block_s"]`` (cheap variants would otherwise be timed over a few
    milliseconds); ratios compare the seconds per step within each round.
    """
    from fedpriv.common.tf_runtime import keras

    batches, source = fixed_batches(batch_size, seed)
    free = free_memory_bytes(gpu) if memory_guard else None
    timers, steps, skipped, implementations = {}, {}, {}, {}
    for variant in VARIANTS:
        if variant == "noise_draw":  # a normal for each trainable weight, as every DP step draws
            weights = timers["nonprivate"].model.trainable_weights
            timer: Any = DrawTimer(sum(w.shape.num_elements() for w in weights))
        else:
            keras().utils.set_random_seed(seed)  # same initial weights for every variant
            trainer = build(variant, model_name, batch_size)
            if variant == "fixed_noise":
                draw_nothing(trainer)
            if variant == "default":
                # "auto" picks one of the implementations timed above: time that trainer (already
                # traced and compiled) again, under this name, rather than tracing the same code twice
                trainer = next((t.trainer for v, t in timers.items()
                                if v != "nonprivate" and t.implementation == trainer.implementation), trainer)
            timer = Timer(trainer, batches, gpu, tf)
            timer.model(batches[0][0][:1])  # build the layers, so their shapes are known
        implementations[variant] = timer.implementation
        if variant != "noise_draw" and (reason := too_big(timer, batch_size, free)):
            print(f"    {variant}: {reason}", file=sys.stderr, flush=True)
            skipped[variant] = reason
            continue
        timer.run(settings["warmup"])  # tracing, compilation and first-step allocations
        one = timer.run(1)
        fill = math.ceil(settings["min_block_s"] / one)
        steps[variant] = max(settings["steps"], min(settings["max_steps"], fill))
        timers[variant] = timer
    if "nonprivate" not in timers:
        raise SystemExit("error: the non-private baseline could not run")
    order = list(timers)
    shuffler = random.Random(seed)
    seconds: dict[str, list[float]] = {v: [] for v in timers}  # seconds per step, one per round
    for index in range(settings["rounds"]):
        shuffler.shuffle(order)
        for variant in order:
            if IMPLEMENTATION.get(variant) in JACOBIAN_IMPLEMENTATIONS and index >= settings["reference_rounds"]:
                continue
            seconds[variant].append(timers[variant].run(steps[variant]) / steps[variant])
    base = seconds["nonprivate"]
    entry: dict[str, Any] = {"default_implementation": None, "examples_per_s": {}, "step_ms": {},
                             "steps_per_round": steps, "rounds_timed": {v: len(s) for v, s in seconds.items()}}
    for variant in VARIANTS:
        if variant not in timers:
            entry["examples_per_s"][variant] = entry["step_ms"][variant] = None
            entry[f"{variant}_ratio"] = entry[f"{variant}_ratio_range"] = None
            continue
        per_step = statistics.median(seconds[variant])
        # (the noise draw trains on no examples)
        entry["examples_per_s"][variant] = None if variant == "noise_draw" else batch_size / per_step
        entry["step_ms"][variant] = 1000 * per_step
        if variant != "nonprivate":
            per_round = [s / b for s, b in zip(seconds[variant], base)]  # (from round 0: the same rounds)
            entry[f"{variant}_ratio"] = statistics.median(per_round)
            entry[f"{variant}_ratio_range"] = [min(per_round), max(per_round)]
    entry["default_implementation"] = implementations["default"]
    if skipped:
        entry["skipped"] = skipped
    entry["data"] = source
    entry["noise_draw_normals"] = timers["noise_draw"].count
    if gpu:
        entry["peak_gpu_memory_bytes"] = {v: t.peak_bytes for v, t in timers.items() if v != "noise_draw"}
    return entry


def versions() -> dict:
    info = machine()["versions"]
    info["python"] = platform.python_version()
    return info


def machine_info(tf: Any) -> dict:
    info = {k: v for k, v in machine().items() if k != "versions"}
    info["cpu"] = cpu_model()
    info["gpus"] = gpu_names(tf)
    if info["gpus"]:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def table(results: dict) -> str:
    lines = [
        "| model | batch | variant | examples/s | step time vs non-private | spread over rounds |",
        "|---|---:|---|---:|---:|---|",
    ]
    for model, by_batch in results.items():
        for batch, entry in by_batch.items():
            for variant in VARIANTS:
                name = LABELS.get(variant, variant)
                if variant == "default":
                    name = f"default (auto: {entry['default_implementation']})"
                if entry["step_ms"][variant] is None:
                    lines.append(f"| {model} | {batch} | {name} | - | - | {entry['skipped'][variant]} |")
                    continue
                if variant == "nonprivate":
                    ratio, spread = "1.00x", "-"
                else:
                    low, high = entry[f"{variant}_ratio_range"]
                    ratio, spread = f"{entry[f'{variant}_ratio']:.2f}x", f"{low:.2f}-{high:.2f}"
                rate = entry["examples_per_s"][variant]
                lines.append(f"| {model} | {batch} | {name} | {'-' if rate is None else f'{rate:,.0f}'} "
                             f"| {ratio} | {spread} |")
    return "\n".join(lines)


def save(out: Path, results: dict, settings: dict, args: argparse.Namespace, gpu: bool, tf: Any,
         wall: float, final: bool) -> str:
    """Write dp_step.json and dp_step.md (``complete`` false until the last configuration);
    return the Markdown table."""
    for model in results.values():  # sanity: every measured ratio is a positive number
        for entry in model.values():
            ratios = [entry[f"{v}_ratio"] for v in VARIANTS[1:] if entry[f"{v}_ratio"] is not None]
            assert all(math.isfinite(r) and r > 0 for r in ratios), entry
    device = "gpu" if gpu else "cpu"
    payload = {
        **results,
        "device": device,
        "seed": args.seed,
        "quick": args.quick,
        "complete": final,
        "settings": {**settings, "batch_sizes": list(settings["batch_sizes"]),
                     "distinct_batches": DISTINCT_BATCHES, "input_shape": list(INPUT_SHAPE),
                     "memory_guard": not args.no_memory_guard},
        "wall_time_s": wall,
        "machine": machine_info(tf),
        "versions": versions(),
    }
    report = table(results)
    where = (payload["machine"]["gpus"][0] if gpu
             else f"{payload['machine']['cpus']} CPUs ({payload['machine']['cpu']})")
    header = (f"Local training throughput (the trainer's step on the same fixed batches), median of "
              f"{settings['rounds']} interleaved rounds (the textbook and vectorized optimizers, for "
              f"reference, in the first {min(settings['reference_rounds'], settings['rounds'])} only); "
              f"each variant runs at least {settings['steps']} "
              f"steps a round (cheap ones more, to fill {settings['min_block_s']:g} s) after "
              f"untimed warm-up steps ({settings['warmup']}). On {where}; seed {args.seed}; "
              f"TensorFlow {payload['versions'].get('tensorflow')}, TF Privacy "
              f"{payload['versions'].get('tensorflow-privacy')}. Step time vs non-private: the "
              f"variant's seconds per step / non-private seconds per step in the same round, median "
              f"(min-max over rounds in the last column). The last three rows of each configuration "
              f"split the default's cost: its clipping alone (noise multiplier 0); the default with "
              f"its noise pool refilled from one fixed tensor (noise added, nothing drawn: not "
              f"private), so that its gap to the default is what drawing costs the step; and one "
              f"step's noise drawn alone (no training), whose ratio is its share of a non-private step.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_step.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "dp_step.md").write_text(f"# DP-SGD step cost ({device})\n\n{header}\n\n{report}\n")
    return report


def csv_list(kind: type) -> Any:
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for tests: batch {QUICK['batch_sizes'][0]}, "
                             f"{QUICK['steps']} steps x {QUICK['rounds']} rounds")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto",
                        help="gpu: fail if TensorFlow sees none; auto: the GPU if there is one")
    parser.add_argument("--models", type=csv_list(str), default=list(MODELS), help="cnn,mlp")
    parser.add_argument("--batch-sizes", type=csv_list(int), default=None, help="default 64,256")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (the median is kept)")
    parser.add_argument("--min-block-s", type=float, default=None,
                        help="cheap variants run more steps per round, to fill this many seconds")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-memory-guard", action="store_true",
                        help="run the per-example-jacobian variants even where they may not fit in memory")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args()
    if unknown := set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")

    settings = dict(QUICK if args.quick else FULL)
    for key in ("batch_sizes", "steps", "rounds", "min_block_s"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if min(settings["batch_sizes"]) < 1 or settings["steps"] < 1 or settings["rounds"] < 1:
        parser.error("batch sizes, --steps and --rounds must be positive")
    if settings["min_block_s"] < 0:
        parser.error("--min-block-s must not be negative")
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedpriv-dp-step-quick-")) if args.quick else RESULTS)

    select_device(args.device)
    from fedpriv.common.tf_runtime import tf as load_tf

    tf = load_tf()
    gpu = bool(tf.config.list_physical_devices("GPU")) and args.device != "cpu"
    if args.device == "gpu" and not gpu:
        print("error: --device gpu, but TensorFlow sees no GPU "
              f"(built with CUDA: {tf.test.is_built_with_cuda()})", file=sys.stderr)
        return 2

    started = time.perf_counter()
    results: dict[str, Any] = {}
    for model in args.models:
        results[model] = {}
        for batch in settings["batch_sizes"]:
            print(f"  {model}, batch {batch} ...", file=sys.stderr, flush=True)
            results[model][str(batch)] = measure(model, batch, settings, gpu, tf, args.seed,
                                                 memory_guard=not args.no_memory_guard)
            # Saved after each configuration, so a run stopped by a timeout keeps what it measured.
            save(out, results, settings, args, gpu, tf, time.perf_counter() - started, final=False)
    report = save(out, results, settings, args, gpu, tf, time.perf_counter() - started, final=True)
    print(report)
    print(f"\nwrote {out / 'dp_step.json'} and dp_step.md ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
