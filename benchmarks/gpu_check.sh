#!/usr/bin/env bash
# GPU check: DP-SGD step cost on the GPU, and a simulation with a fractional GPU per virtual client.
#
# Run from the repository root on a machine with an NVIDIA GPU and the project's environment:
#
#     bash benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# In order, each step under `timeout` and all of them inside GPU_CHECK_BUDGET_S (default 450 s, so
# the script ends in under 8 minutes even if a step hangs):
#   1. nvidia-smi: the GPU, its driver and memory (or a note that there is none);
#   2. the Python environment: Python, TensorFlow, its CUDA build, and the GPUs TensorFlow sees;
#   3. benchmarks/dp_step.py on the GPU (a shorter run than the CPU default), sampling GPU memory;
#      if TensorFlow sees no GPU, it says so and runs the quick CPU benchmark instead;
#   4. `fedpriv simulate` (quickstart, 2 rounds, 8 clients, simulation.gpus_per_client = 0.25, so
#      four clients share the GPU), sampling GPU memory and the processes on the GPU;
#   5. a summary: examples/s DP vs non-DP, ratios, simulation wall time and accuracy, peak memory.
# Writes dp_step.json, dp_step.md, sim_summary.json, gpu_check_summary.txt and gpu_check.log to
# $OUT_DIR (default: $OUT if set, else benchmarks/results/gpu). Exits 0 when the GPU numbers were
# measured, 1 when a step failed or TensorFlow saw no GPU (CPU numbers only), 3 when no Python with
# TensorFlow was found. Environment: PYTHON (default .venv/bin/python, else python3),
# GPU_CHECK_BUDGET_S, DP_STEP_ARGS (extra arguments for dp_step.py).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedpriv-gpu-check-XXXXXX")"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FEDPRIV_HOME="$WORK/home"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

SAMPLER_PID=""
cleanup() {
    if [[ -n "$SAMPLER_PID" ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

section() { printf '\n=== %s (%ds elapsed) ===\n' "$1" "$SECONDS"; }

# run_step MAX_S COMMAND...: COMMAND under `timeout`, capped by what is left of the budget (less
# RESERVE_S for the summary); its exit status, 124 on a timeout, and never an exit of this script.
RESERVE_S=20
run_step() {
    local max_s="$1"; shift
    local left=$((DEADLINE - SECONDS - RESERVE_S))
    if ((left < 10)); then echo "skipped: out of time budget"; return 124; fi
    ((max_s < left)) || max_s=$left
    local status=0
    timeout --kill-after=10 "$max_s" "$@" || status=$?
    if ((status == 124 || status == 137)); then echo "timed out after ${max_s}s: $*"; fi
    return "$status"
}

HAVE_SMI=0
command -v nvidia-smi >/dev/null 2>&1 && HAVE_SMI=1

# sample_start FILE: log GPU memory used (MiB) every 500 ms into FILE, and the compute processes
# every second into FILE.apps, until sample_stop. Does nothing without nvidia-smi.
sample_start() {
    SAMPLER_PID=""
    ((HAVE_SMI)) || return 0
    (
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$1" 2>/dev/null &
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 1000 \
            >"$1.apps" 2>/dev/null &
        trap 'kill $(jobs -p) 2>/dev/null' TERM
        wait
    ) &
    SAMPLER_PID=$!
}
sample_stop() {
    if [[ -n "$SAMPLER_PID" ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""
    fi
}
max_mib() { [[ -s "$1" ]] && sort -n "$1" | tail -n 1 || echo "n/a"; }
gpu_pids() { [[ -s "$1" ]] && awk -F, 'NF > 1 && !seen[$1]++ { n++ } END { print n + 0 }' "$1" || echo "n/a"; }

STATUS=0

# ---- 1. the GPU ----------------------------------------------------------------------------------
section "1. nvidia-smi"
if ((HAVE_SMI)); then
    run_step 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used \
        --format=csv || echo "nvidia-smi failed"
    run_step 20 nvidia-smi || true
else
    echo "nvidia-smi not found: no NVIDIA driver on this machine (CPU numbers only)"
fi

# ---- 2. the Python environment -------------------------------------------------------------------
section "2. Python and TensorFlow"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "python: $PY"
TF_GPUS=-1
if env_out="$(run_step 120 "$PY" - <<'EOF'
import platform
import fedpriv.common.tf_runtime as rt  # sets TF_USE_LEGACY_KERAS and the TF Privacy import flag first
tf = rt.tf()
rt.keras()
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras  # noqa: F401
import flwr
info = tf.sysconfig.get_build_info()
print("python", platform.python_version())
print("tensorflow", tf.__version__, "| built with CUDA:", tf.test.is_built_with_cuda(),
      "| CUDA", info.get("cuda_version"), "| cuDNN", info.get("cudnn_version"))
print("flwr", flwr.__version__)
gpus = tf.config.list_physical_devices("GPU")
print("tf.config.list_physical_devices('GPU'):", gpus)
print(f"TF_GPUS={len(gpus)}")
EOF
)"; then
    echo "$env_out"
    TF_GPUS="$(sed -n 's/^TF_GPUS=//p' <<<"$env_out")"
else
    echo "$env_out"
    echo "ERROR: '$PY' cannot import the project's stack (TensorFlow, tf-keras, TF Privacy, Flower)."
    echo "The project's environment (.venv, made by 'uv sync --locked --python 3.11') must exist on"
    echo "this machine; nothing can be measured without it."
    cat >"$OUT_DIR/gpu_check_summary.txt" <<EOF
gpu_check: no Python with the project's stack ($PY); nothing measured.
nvidia-smi: $( ((HAVE_SMI)) && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "not found")
EOF
    exit 3
fi
if [[ "$TF_GPUS" -gt 0 ]]; then
    DEVICE=gpu
    DP_ARGS=(--device gpu --steps 5 --rounds 5 --min-block-s 0.3)
else
    DEVICE=cpu
    STATUS=1
    echo "WARNING: TensorFlow sees no GPU. The locked environment has the plain tensorflow wheel,"
    echo "which finds CUDA 12 and cuDNN 9 only on the library path or through the nvidia-*-cu12 pip"
    echo "packages of 'tensorflow[and-cuda]' (not in uv.lock); see the CUDA build line above."
    ((HAVE_SMI)) && echo "nvidia-smi sees: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    echo "Running the quick CPU benchmark instead, so that the script still produces numbers."
    DP_ARGS=(--device cpu --quick)
fi

# ---- 3. DP-SGD step cost -------------------------------------------------------------------------
section "3. DP-SGD step benchmark ($DEVICE)"
sample_start "$WORK/mem_dp"
# shellcheck disable=SC2086 # DP_STEP_ARGS is a list of words on purpose
run_step 210 "$PY" benchmarks/dp_step.py "${DP_ARGS[@]}" --out "$OUT_DIR" ${DP_STEP_ARGS:-} || STATUS=1
sample_stop
PEAK_DP="$(max_mib "$WORK/mem_dp")"

# ---- 4. simulation with a fractional GPU per client ----------------------------------------------
section "4. simulation: 8 clients, 0.25 GPU each"
SIM_DIR="$WORK/sim"
sample_start "$WORK/mem_sim"
sim_start=$SECONDS
run_step 170 "$PY" -m fedpriv simulate --preset quickstart --set run.rounds=2 \
    --set federation.num_clients=8 --set federation.min_available_clients=8 \
    --set simulation.gpus_per_client=0.25 --out "$SIM_DIR" || STATUS=1
SIM_WALL=$((SECONDS - sim_start))
sample_stop
PEAK_SIM="$(max_mib "$WORK/mem_sim")"
SIM_PROCS="$(gpu_pids "$WORK/mem_sim.apps")"
[[ -f "$SIM_DIR/summary.json" ]] && cp "$SIM_DIR/summary.json" "$OUT_DIR/sim_summary.json"

# ---- 5. summary ----------------------------------------------------------------------------------
section "5. summary"
RESERVE_S=0  # the reserve was kept for this step
SUMMARY_PY="$PY"
"$PY" -c "" 2>/dev/null || SUMMARY_PY=python3
run_step 30 "$SUMMARY_PY" - "$OUT_DIR" "$DEVICE" "$SIM_WALL" "$PEAK_DP" "$PEAK_SIM" "$SIM_PROCS" <<'EOF' \
    | tee "$OUT_DIR/gpu_check_summary.txt" || STATUS=1
import json, sys
from pathlib import Path

out, device, sim_wall, peak_dp, peak_sim, sim_procs = sys.argv[1:7]
print(f"device: {device}")
bench = Path(out) / "dp_step.json"
mib = lambda b: f"{b / 2**20:,.0f}"
ratio = lambda v: "skipped" if v is None else f"{v:.2f}x"
if bench.exists():
    r = json.loads(bench.read_text())
    if not r.get("complete", True):
        print("DP-SGD step benchmark INCOMPLETE (stopped early): the configurations measured so far")
    where = ", ".join(r["machine"].get("gpus") or []) or r["machine"].get("cpu")
    print(f"DP-SGD step benchmark on {r['device']} ({where}), TensorFlow "
          f"{r['versions'].get('tensorflow')}, seed {r['seed']}, {r['wall_time_s']:.0f} s")
    print("| model | batch | non-DP ex/s | DP ex/s (default) | default | textbook | vectorized | fast "
          "| peak TF GPU MiB: non-DP / default / max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for model in ("cnn", "mlp"):
        for batch, e in r.get(model, {}).items():
            eps, peak = e["examples_per_s"], e.get("peak_gpu_memory_bytes")
            mem = "-" if not peak else " / ".join(
                mib(b) for b in (peak["nonprivate"], peak.get("default", 0), max(peak.values())))
            print(f"| {model} | {batch} | {eps['nonprivate']:,.0f} | {eps['default']:,.0f} "
                  f"({e['default_implementation']}) | {ratio(e['default_ratio'])} "
                  f"| {ratio(e['textbook_ratio'])} | {ratio(e['vectorized_ratio'])} "
                  f"| {ratio(e['fast_ratio'])} | {mem} |")
else:
    print("DP-SGD step benchmark: no results (failed or timed out; see gpu_check.log)")
print(f"peak GPU memory used during the benchmark (nvidia-smi): {peak_dp} MiB")
sim = Path(out) / "sim_summary.json"
if sim.exists():
    s = json.loads(sim.read_text())
    eps = s["privacy"]["record_level"]["max_epsilon"]
    share = "at 0.25 GPU each" if device == "gpu" else "on CPUs (no GPU for TensorFlow)"
    print(f"simulation: {len(s['rounds'])} rounds, 8 clients {share}, wall {sim_wall} s, final accuracy "
          f"{s['final_accuracy']:.4f}, record-level epsilon {eps if eps is None else round(eps, 2)}")
else:
    print(f"simulation: no summary (failed or timed out after {sim_wall} s; see gpu_check.log)")
print(f"peak GPU memory used during the simulation (nvidia-smi): {peak_sim} MiB; "
      f"processes seen on the GPU: {sim_procs}")
EOF
echo "results in $OUT_DIR (total ${SECONDS}s); exit status $STATUS"
exit "$STATUS"
