#!/usr/bin/env bash
# Build a wheel and an sdist, check the wheel's extension for ISA leaks (scripts/check_isa.py),
# install the wheel into a fresh virtual environment (not editable, not the source tree) and
# run the golden and opcheck tests against the installed package once per instruction-set
# level this CPU runs (SHVIT_KERNELS_ISA). Uses .venv (scripts/setup_env.sh) to build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "wheel: building in $work"
.venv/bin/python setup.py -q sdist -d "$work/dist" >/dev/null 2>&1
# the wheel from the sdist: proves the sdist holds every source
SHVIT_KERNELS_REQUIRE_CPP=1 .venv/bin/pip wheel -q --no-build-isolation --no-deps "$work"/dist/*.tar.gz \
  -w "$work/dist" 2>&1 | grep -v "^WARNING: Location" || true
whl=$(ls "$work"/dist/*.whl)
ls -l "$work"/dist
(cd "$work" && python3 -m zipfile -e "$whl" unpacked)
# its summary line, or the whole report when it fails (not piped into head: the report would
# then hit a closed pipe)
if ! .venv/bin/python scripts/check_isa.py "$work"/unpacked/shvit_kernels/_C*.so > "$work/isa.txt"; then
  cat "$work/isa.txt"
  exit 1
fi
head -1 "$work/isa.txt"

torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
python3 -m venv "$work/venv"
VPY="$work/venv/bin/python"
"$VPY" -m pip install -q "torch==$torch_version" numpy pytest 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -m pip install -q --no-deps "$whl"
cp -r tests "$work/tests"
cd "$work"  # nothing of the source tree on the path
"$VPY" - <<'PY'
import shvit, shvit_kernels
from shvit_kernels import _cpp
assert "site-packages" in shvit.__file__ and "site-packages" in shvit_kernels.__file__, shvit.__file__
assert _cpp.available(), "the installed wheel must load its extension"
print(f"wheel: installed {shvit_kernels.__file__}, ISA levels {_cpp.levels()}")
PY
levels=$("$VPY" -c "from shvit_kernels import _cpp; print(' '.join(_cpp.levels()))")
for level in $levels; do
  echo "wheel: SHVIT_KERNELS_ISA=$level"
  SHVIT_KERNELS_ISA=$level SHVIT_KERNELS_BACKEND=auto "$VPY" -m pytest -q -p no:cacheprovider \
    tests/test_model.py tests/test_fused_model.py tests/test_ops.py -k "not triton" 2>&1 | tail -1
  test "${PIPESTATUS[0]}" = 0
done
