#!/usr/bin/env bash
# Create .venv in the repository (reusing an installed torch when there is one), install the
# build and test tools and the package itself (editable). Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing torch from $("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found, installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -r requirements.txt
# The editable install compiles the C++ kernels (minutes on 2 cores); it is skipped when the
# last one here used the same build settings and torch, and no build input changed since
# (SHVIT_KERNELS_REBUILD=1 forces it).
stamp=.venv/.shvit-build
want="no_cpp=${SHVIT_KERNELS_NO_CPP:-0} torch=$("$VPY" -c 'import torch; print(torch.__version__)')"
if [ "${SHVIT_KERNELS_REBUILD:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ -z "$(find csrc setup.py pyproject.toml requirements.txt -newer "$stamp" 2>/dev/null)" ] \
    && "$VPY" -c "import sys, shvit; from shvit_kernels import _cpp
sys.exit(0 if '${SHVIT_KERNELS_NO_CPP:-0}' == '1' or _cpp.available() else 1)" >/dev/null 2>&1; then
  echo "setup: package installed, C++ build up to date ($want)"
else
  rm -f "$stamp"
  # a failed C++ build is an error here (for users it is a warning and a pure-Python install):
  # tests must not run, skipped, against a stale or missing extension
  SHVIT_KERNELS_REQUIRE_CPP="${SHVIT_KERNELS_REQUIRE_CPP:-1}" "$VPY" -m pip install -q --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
"$VPY" -c "import torch, shvit; print(f'setup: torch {torch.__version__}, shvit from {shvit.__file__}')"
