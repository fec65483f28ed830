#!/usr/bin/env bash
# The installed build on a CPU without AVX/AVX2: QEMU's user-mode emulation of a Nehalem core
# (SSE4.2, no AVX) runs scripts/old_cpu_check.py; an AVX instruction outside the dispatched
# kernels would end it with SIGILL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(uname -m)" = x86_64 ] || { echo "old CPU check: x86-64 only"; exit 0; }
if ! command -v qemu-x86_64 >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q qemu-user >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q qemu-user >/dev/null; }
fi
qemu-x86_64 -cpu Nehalem .venv/bin/python scripts/old_cpu_check.py 2>&1 | grep -v NNPACK
test "${PIPESTATUS[0]}" = 0
