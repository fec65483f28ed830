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
"$VPY" -m pip install -q --no-build-isolation -e .
"$VPY" -c "import torch, shvit; print(f'setup: torch {torch.__version__}, shvit from {shvit.__file__}')"
