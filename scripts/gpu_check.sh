#!/usr/bin/env bash
# One-call GPU check of the embedded runtime (`make gpu-check`): CUDA tests, the engine/spec
# CPU tests under this machine's torch, bench-engine on CUDA (float32 and bfloat16, plain vs
# speculative at concurrency 1/8/32/64), greedy agreement of spec vs plain in bfloat16, the
# planner benchmark, and (time allowing) a CUDA profile -> a candidate hardware YAML.
#
#   scripts/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else results/gpu-check
#
# Wheels for packages the machine lacks (msgspec, pyzmq) may be carried in .whl/; they are
# installed into /tmp/site. Every stage runs under its own timeout and a failed stage does
# not stop the next. Writes at most 8 files (gpu_check.log + JSON/YAML) and prints a summary.
set -u
OUT_DIR=${1:-${OUT:-results/gpu-check}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}   # the profile stage runs only with this much time left

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
want() {  # want STAGE: GPU_CHECK_STAGES (comma-separated, default all) names it
    case ",${GPU_CHECK_STAGES:-all}," in *,all,*|*,$1,*) return 0;; *) return 1;; esac
}
stage() {  # stage NAME TIMEOUT_S CMD...: log the command, its output and its exit status
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S), timeout ${limit}s, $(left)s of the budget left): $*" | tee -a "$LOG"
    local t=$(date +%s)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
    return $rc
}

{
    echo "host: $(hostname) $(nproc) cores, $(date -u)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
        --format=csv 2>&1
    $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >> "$LOG" 2>&1

if ls .whl/*.whl > /dev/null 2>&1; then
    stage wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    # Subprocesses that set their own PYTHONPATH (the tests' sidecars) see them through a .pth.
    $PY -c "import site; open(site.getsitepackages()[0] + '/sglang_slo_wheels.pth', 'w').write('/tmp/site\n')" \
        >> "$LOG" 2>&1 || echo "(no .pth written: subprocesses may miss the wheels)" >> "$LOG"
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# GPU tests: the files with gpu-marked tests (the rest of tests/ may need packages absent here).
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py)
want gpu-tests && stage gpu-tests 240 $PY -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS

# Engine, speculation and model tests on the CPU, under this machine's torch.
CPU_TESTS=$(ls tests/test_engine_*.py tests/test_spec_*.py tests/test_model_*.py)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
want cpu-tests && stage cpu-tests 240 env OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider -m "not gpu" $XDIST $CPU_TESTS

# Embedded engine throughput on the GPU.
BENCH="$PY -m sglang_slo.cli bench-engine --json --device cuda --concurrency 1 8 32 64"
want sdpa-check && stage sdpa-check 90 $PY scripts/sdpa_check.py   # JSON line in the log
want bench-fp32 && stage bench-fp32 180 sh -c "$BENCH --dtype float32 --sweep > $OUT_DIR/bench_fp32.json"
want bench-bf16 && stage bench-bf16 150 sh -c "$BENCH --dtype bfloat16 > $OUT_DIR/bench_bf16.json"
want bench-fp32-depth4 && stage bench-fp32-depth4 150 sh -c "$PY -m sglang_slo.cli bench-engine --json --device cuda --depth 4 \
    --concurrency 8 32 64 128 --single-prompts 2 > $OUT_DIR/bench_fp32_depth4.json"

# Greedy spec == plain in bfloat16? (float32 is asserted by tests/test_engine_cuda.py.)
want bf16-agreement && stage bf16-agreement 120 sh -c "$PY scripts/spec_agreement.py --device cuda \
    --prompts 16 --new-tokens 64 > $OUT_DIR/agreement.json"

# Planner: plan latency per policy and ZMQ round trip on this (quiet) host.
want bench-planner && stage bench-planner 180 sh -c "$PY -m sglang_slo.cli bench-planner --json --policies fcfs,slo_unified \
    --sizes 64,256,1024,4096 > $OUT_DIR/bench_planner.json"

# A CUDA profile of the tiny pair as the budget allows (CPU, one thread: the quick grid is
# ~15 s per sweep, the full one ~3x that).
if [ "$(left)" -gt 300 ]; then GRID="--grid full --repeats 3"; else GRID="--grid quick --repeats 2"; fi
if ! want profile; then
    echo "=== profile: not asked for" | tee -a "$LOG"
elif [ "$(left)" -gt 90 ]; then
    stage profile $(( $(left) - 15 )) sh -c "$PY -m sglang_slo.cli profile --device cuda \
        --model sglang_slo/assets/tiny/target --draft sglang_slo/assets/tiny/draft $GRID \
        --out $OUT_DIR/h200-tiny.yaml > $OUT_DIR/profile.json"
else
    echo "=== profile: skipped ($(left)s left)" | tee -a "$LOG"
fi

$PY scripts/gpu_check_summary.py "$OUT_DIR" 2>&1 | tee -a "$LOG"
