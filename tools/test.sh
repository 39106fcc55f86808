#!/usr/bin/env bash
# Builds everything and runs the whole test suite: CTest (the C++ tests), then pytest (the Python
# package, installed with pip into the venv build/pyvenv; FLASHATTN_SKIP_PYTHON=1 skips that step).
# The venv gets torch and transformers from PyPI so that the torch tests run (PyPI's Linux torch wheel
# pulls the CUDA runtime libraries, ~5 GB in the venv; it runs on the CPU; the first install took
# 89 s + 26 s on the 2-core development machine, later runs find them installed).
# FLASHATTN_SKIP_TORCH=1 leaves them out: the torch tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI (CI=true) builds with warnings as errors: our own code builds without any.
tools/build.sh ${CI:+-DFLASHATTN_WERROR=ON}
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 1200)
# The GPU tests (label gpu) skip themselves without a usable GPU; say how many did.
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  gpu_tests=$(cd build && ctest -N -L gpu | sed -n 's/^Total Tests: //p')
  echo "flashattn: ${gpu_tests:-0} GPU tests skipped (no usable GPU here; the device runs under bench/results/ ran them)"
fi

[[ ${FLASHATTN_SKIP_PYTHON:-0} == 1 ]] && { echo "flashattn: Python tests skipped (FLASHATTN_SKIP_PYTHON=1)"; exit 0; }

# ---- Python package: pip install . into build/pyvenv, then pytest tests/python ----------------
fail() { echo "flashattn: Python step failed: $*" >&2; exit 1; }
start=$SECONDS
venv=build/pyvenv
python=${PYTHON:-python3}
command -v "$python" >/dev/null || fail "no $python found (set PYTHON=/path/to/python3, or FLASHATTN_SKIP_PYTHON=1)"
if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv "$venv" >/dev/null ||
    fail "'$python -m venv $venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
pip_log=build/pyvenv-pip.log
: >"$pip_log"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "scikit-build-core>=0.10" "nanobind>=2.0" numpy pytest >>"$pip_log" 2>&1 ||
  { tail -n 30 "$pip_log" >&2; fail "installing the build dependencies into $venv (log: $pip_log)"; }
if [[ ${FLASHATTN_SKIP_TORCH:-0} == 1 ]]; then
  echo "flashattn: torch and transformers not installed (FLASHATTN_SKIP_TORCH=1): their tests skip"
else
  torch_start=$SECONDS
  "$venv/bin/python" -m pip install -q --disable-pip-version-check torch transformers >>"$pip_log" 2>&1 ||
    { tail -n 30 "$pip_log" >&2
      fail "pip install torch transformers into $venv (log: $pip_log); needs PyPI (several GB: the Linux wheel
  brings the CUDA runtime libraries). FLASHATTN_SKIP_TORCH=1 runs the suite without them (the torch tests skip)"; }
  echo "flashattn: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') and transformers" \
       "in $venv ($((SECONDS - torch_start)) s)"
fi
# No build isolation: the venv's scikit-build-core and nanobind build it, and build/py/ keeps the
# CMake build between runs so only what changed is recompiled.
"$venv/bin/python" -m pip install --no-build-isolation --disable-pip-version-check -v . >>"$pip_log" 2>&1 ||
  { tail -n 40 "$pip_log" >&2; fail "pip install . (log: $pip_log)"; }
echo "flashattn: Python package installed into $venv in $((SECONDS - start)) s"
"$venv/bin/python" -m pytest tests/python -q -p no:cacheprovider
