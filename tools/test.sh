#!/usr/bin/env bash
# Builds everything and runs the whole test suite (CTest: the C++ tests).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 1200
