#!/usr/bin/env bash
# The main job: builds flashattn-bench and runs it on its default problem, on the GPU when one is
# usable, else on the CPU. Arguments go to flashattn-bench (try --help).
#
# Without a usable GPU (no nvidia-smi, or it lists none) the CUDA code is not compiled: the CPU
# build takes about a minute where the CUDA kernels would take several. FLASHATTN_CUDA=ON forces
# the CUDA build (and OFF skips it) either way. It builds in build-bench/, apart from the test
# build in build/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${FLASHATTN_CUDA:-} ]]; then
  cuda=$FLASHATTN_CUDA
elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  cuda=AUTO
else
  cuda=OFF
  echo "flashattn: no usable GPU here: building the CPU backend only (FLASHATTN_CUDA=ON forces CUDA)" >&2
fi
FLASHATTN_BUILD_DIR=build-bench FLASHATTN_BUILD_TARGET=flashattn-bench tools/build.sh -DFLASHATTN_CUDA="$cuda" >&2
exec build-bench/apps/flashattn-bench "$@"
