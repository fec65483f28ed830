#!/usr/bin/env bash
# GPU check for an offline CUDA machine with torch and triton preinstalled (no network):
# installs the package without fetching anything, runs the CUDA tests, times the kernels,
# and writes env.txt, tests.log, tests.xml, bench.log, shsa_cuda.{json,csv}, model.log and
# model_cuda.{json,csv} under $OUT (default benchmarks/results/gpu). Budget: under 9 minutes.
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1; then
  echo "pip install failed (see install.log); importing from the source tree"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== CUDA tests"
timeout 270 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "pytest exit code $?"
tail -n 25 "$OUT/tests.log"
echo "== kernel benchmarks"
timeout 180 "$PY" -m benchmarks.bench_shsa --device cuda --dtype float16 --batch 256 --out "$OUT/shsa_cuda.json" > "$OUT/bench.log" 2>&1
echo "bench exit code $?"
tail -n 22 "$OUT/bench.log"
echo "== model throughput (batch 256, float16 autocast) and training step"
timeout 200 "$PY" -m benchmarks.bench_model --device cuda --variants shvit_s1 shvit_s4 --train-variants shvit_s1 \
  --min-time 1 --out "$OUT/model_cuda" > "$OUT/model.log" 2>&1
echo "model bench exit code $?"
tail -n 14 "$OUT/model.log"
