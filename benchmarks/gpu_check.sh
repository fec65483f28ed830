#!/usr/bin/env bash
# GPU check for an offline CUDA machine with torch and triton preinstalled (no network):
# installs the package without fetching anything, compiles the kernels for this GPU with the
# installed Triton (ptxas registers/spills, the tiles the launchers pick), runs the CUDA
# tests, times the fused mixer (bandwidth against a measured device copy) and the models.
# Writes env.txt, gpu_compile.{json,md}, tests.log, tests.xml, bench.log, shsa_cuda.{json,csv},
# model.log, model_cuda.{json,csv} and status.txt under $OUT (default benchmarks/results/gpu).
# Exits non-zero when any step fails. Budget: at most 8 minutes (the steps time out at 90 + 190
# + 100 + 100 s).
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every step, on CPU tensors and small sizes
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
failed=()

step() {  # step NAME TIMEOUT LOG COMMAND...: run, record its exit code, keep going
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: exit code $rc" | tee -a "$OUT/status.txt"
  tail -n 25 "$log"
  if [ "$rc" != 0 ]; then status=1; failed+=("$name"); fi
}

: > "$OUT/status.txt"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  [ "$DRY" = 1 ] && echo "dry run (CPU)" || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import shvit, shvit_kernels" > /dev/null 2>&1; then
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1; then
    echo "pip install failed (see install.log); importing from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

if [ "$DRY" = 1 ]; then
  CAP=80
  COMPILE_ARGS=(--kernel infer --batch 1)
  TEST_ARGS=(--collect-only)
  BENCH_ARGS=(--device cpu --dtype float32 --batch 2 --cases s4-stage3-256px --min-time 0.01)
  MODEL_ARGS=(--device cpu --variants shvit_s1 --train-variants shvit_s1 --batch 1 --train-batch 2 --no-compile --min-time 0.01)
else
  CAP=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(c[0] * 10 + c[1])")
  COMPILE_ARGS=()
  TEST_ARGS=()
  BENCH_ARGS=(--device cuda --dtype float16 --batch 256)
  MODEL_ARGS=(--device cuda --variants shvit_s1 shvit_s4 --train-variants shvit_s1 --min-time 1)
fi
# this GPU's architecture (sm_80 for A100-class, sm_90a for H100/H200), float16, both layouts
[ "$CAP" -ge 90 ] && CAP=90 || CAP=80
step "compile check (installed Triton, sm_$CAP)" 90 "$OUT/gpu_compile.log" \
  "$PY" -m benchmarks.gpu_compile --subset --arch "$CAP" --dtype float16 --out "$OUT/gpu_compile" "${COMPILE_ARGS[@]}"
step "CUDA tests" 190 "$OUT/tests.log" \
  "$PY" -m pytest tests -q -k cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TEST_ARGS[@]}"
step "kernel benchmarks" 100 "$OUT/bench.log" \
  "$PY" -m benchmarks.bench_shsa "${BENCH_ARGS[@]}" --out "$OUT/shsa_cuda.json"
step "model throughput and training step" 100 "$OUT/model.log" \
  "$PY" -m benchmarks.bench_model "${MODEL_ARGS[@]}" --out "$OUT/model_cuda"
if [ "$status" != 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$OUT/status.txt"
else
  echo "all steps passed" | tee -a "$OUT/status.txt"
fi
exit "$status"
