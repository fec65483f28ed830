#!/usr/bin/env bash
# Set up .venv and run the main job on this machine's CPU (the paper's protocol: batch 16,
# one thread; also batch 1 and two threads): model throughput of S1-S4 (eager, eager + fuse(),
# torch.compile, fused=True + fuse(), ONNX Runtime, OpenVINO; bfloat16: eager, compile with
# freezing, fused, OpenVINO) with each one's logit error, a training step (eager vs fused),
# then the fused SHSA mixer against eager at S4's shapes, and a plot.
# Results: benchmarks/results/{model_cpu,shsa_cpu}.{json,csv}, cpu.png.
# Arguments go to the model benchmark (e.g. --variants shvit_s4 --threads 2 --no-compile).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m benchmarks.bench_model "$@"
.venv/bin/python -m benchmarks.bench_shsa --device cpu
.venv/bin/python -m benchmarks.plot --device cpu
