#!/usr/bin/env bash
# Set up .venv and run every test: the test suite, and each pytest-benchmark microbenchmark
# once as a smoke test (timing disabled; `pytest benchmarks --benchmark-only` times them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests benchmarks --benchmark-disable "$@"
