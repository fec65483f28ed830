#!/usr/bin/env bash
# Set up .venv and run the main benchmark (CPU protocol of the paper: batch 16, one thread).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.bench_model "$@"
