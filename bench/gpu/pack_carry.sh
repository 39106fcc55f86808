#!/usr/bin/env bash
# Builds what bench/gpu/run_device.sh runs and packs it into build-carry/ (carried to the device
# machine, whose image has no GoogleTest, OpenBLAS or CLI11):
#   bash bench/gpu/pack_carry.sh [BASELINE_COMMIT]
# flashattn_cuda_tests, flashattn-gpu-bench, flashattn-bench for sm_90a, the shared libraries they
# need beyond the CUDA driver and glibc (lib.tar.xz), COMMIT; with BASELINE_COMMIT also
# base-src.tar.gz, which `run_device.sh bench` builds there and times beside ours.
set -euo pipefail
cd "$(dirname "$0")/../.."
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHATTN_CUDA=ON -DFLASHATTN_CUDA_ARCHS=90a \
  -DFLASHATTN_BUILD_PYTHON=OFF > /dev/null
cmake --build build-gpu -j"$(nproc)" --target flashattn_cuda_tests flashattn-gpu-bench flashattn-bench
out=build-carry
rm -rf "$out" && mkdir -p "$out/lib"
cp build-gpu/tests/cuda/flashattn_cuda_tests build-gpu/bench/gpu/flashattn-gpu-bench build-gpu/apps/flashattn-bench "$out/"
strip "$out/flashattn_cuda_tests" "$out/flashattn-gpu-bench" "$out/flashattn-bench"
# OpenBLAS (the oracle's baseline) and its Fortran runtime; the rest is in every image.
ldd "$out/flashattn_cuda_tests" "$out/flashattn-bench" | awk '/=>/ {print $3}' |
  grep -E 'openblas|gfortran|quadmath|blas|lapack' | sort -u | xargs -r -I{} cp -L {} "$out/lib/"
tar -cJf "$out/lib.tar.xz" -C "$out" lib && rm -rf "$out/lib"
# Compressed: the device call carries at most 64 MiB, and each binary holds every kernel (~27 MB).
tar -cf - -C "$out" flashattn_cuda_tests flashattn-gpu-bench flashattn-bench | xz -T"$(nproc)" -6 > "$out/bins.tar.xz"
rm "$out/flashattn_cuda_tests" "$out/flashattn-gpu-bench" "$out/flashattn-bench"
git rev-parse --short HEAD > "$out/COMMIT"
git diff --quiet HEAD -- src include tests apps bench || echo "+uncommitted" >> "$out/COMMIT"
if [[ -n ${1:-} ]]; then git archive --format=tar.gz -o "$out/base-src.tar.gz" "$1" && echo "$1" > "$out/BASE_COMMIT"; fi
ls -la "$out"
