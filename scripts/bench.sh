#!/usr/bin/env bash
# Set up .venv and run the main job on this machine's CPU (the paper's protocol: batch 16,
# one thread): model throughput (eager, eager + fuse(), fused=True + fuse()) for S1-S4,
# then the fused SHSA mixer against eager at S4's shapes. Results: benchmarks/results/.
# Arguments go to the model benchmark (e.g. --variants shvit_s4 --threads 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m benchmarks.bench_model "$@"
exec .venv/bin/python -m benchmarks.bench_shsa --device cpu
