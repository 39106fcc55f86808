#!/usr/bin/env bash
# Configures and builds flashattn (Release). Extra arguments go to cmake's configure step.
#   FLASHATTN_BUILD_DIR   the build folder (default build/)
#   FLASHATTN_BUILD_TARGET  build only this target (default: everything)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
dir=${FLASHATTN_BUILD_DIR:-build}
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$dir" -j"$(nproc)" ${FLASHATTN_BUILD_TARGET:+--target "$FLASHATTN_BUILD_TARGET"}
