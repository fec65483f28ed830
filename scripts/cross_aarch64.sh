#!/usr/bin/env bash
# Compiles every C++ source for aarch64 (Debian's g++-aarch64-linux-gnu cross compiler, with
# the flags setup.py uses and the installed torch's headers) so that an x86-only construct
# never reaches an ARM user as a build error. Objects only: linking needs an aarch64 libtorch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CXX=aarch64-linux-gnu-g++
if ! command -v $CXX >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null; }
fi
PY=${PYTHON:-.venv/bin/python}
flags=$("$PY" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]))
PY
)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
srcs=$(find csrc -name '*.cpp' | sort)
n=0
for f in $srcs; do
  echo "$f"
done | xargs -P 2 -I{} sh -c "$CXX -O3 -std=c++17 -fopenmp -fPIC -w -Wno-psabi -Icsrc $flags -DTORCH_EXTENSION_NAME=_C -c {} -o $out/\$(echo {} | tr / _).o"
for o in "$out"/*.o; do n=$((n + 1)); file "$o" | grep -q "ARM aarch64" || { echo "not an aarch64 object: $o"; exit 1; }; done
echo "aarch64: $n of $(echo "$srcs" | wc -w) sources compiled ($($CXX --version | head -1))"
