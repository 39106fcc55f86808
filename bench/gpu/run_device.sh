#!/usr/bin/env bash
# The GPU session in one call, on the device machine, from anywhere in the repo:
#   bash bench/gpu/run_device.sh [quick]
# 1. binaries: prebuilt ones from $PREBUILT (default build-carry/: flashattn_cuda_tests,
#    flashattn-gpu-bench, and lib/ with any shared libraries they need) when present, otherwise a
#    build here (cmake, FLASHATTN_CUDA_ARCHS="80;90", 16 jobs; needs OpenBLAS and GoogleTest);
# 2. the GPU tests (all of them);
# 3. compute-sanitizer memcheck on a small subset, racecheck on one case;
# 4. bench/gpu/bench_sdpa.py: ours vs PyTorch SDPA flash and cuDNN (DESIGN §6 convention).
# Everything is logged under $OUT (default ./device-out): env.txt, tests.log, sanitizer.log,
# bench.log, bench.{md,json} (d 64/128) and bench-extra.{md,json} (d 96/192/256). "quick" skips
# the sanitizers.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
PREBUILT=${PREBUILT:-$ROOT/build-carry}
MODE=${1:-full}
export PYTHONUNBUFFERED=1

{ nvidia-smi; nvcc --version 2>/dev/null | tail -2; python3 -c "import torch; print('torch', torch.__version__)";
  git log -1 --format='commit %H' 2>/dev/null; } > "$OUT/env.txt" 2>&1
head -20 "$OUT/env.txt"

if [[ -x $PREBUILT/flashattn_cuda_tests ]]; then
  echo "== using prebuilt binaries from $PREBUILT"
  # Shared libraries may travel packed (lib.tar.xz) to keep the carried tree small.
  [[ -f $PREBUILT/lib.tar.xz && ! -d $PREBUILT/lib ]] && tar -xJf "$PREBUILT/lib.tar.xz" -C "$PREBUILT"
  TESTS=$PREBUILT/flashattn_cuda_tests
  BENCH_BIN=$PREBUILT/flashattn-gpu-bench
  MAIN_BIN=$PREBUILT/flashattn-bench
  LIBS=$PREBUILT/lib
else
  echo "== building (FLASHATTN_CUDA_ARCHS=80;90)"
  if ! { cmake -S . -B build-device -G Ninja -DFLASHATTN_CUDA=ON -DFLASHATTN_CUDA_ARCHS="80;90" \
           && cmake --build build-device -j16; } > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build failed"
    exit 1
  fi
  TESTS=build-device/tests/cuda/flashattn_cuda_tests
  BENCH_BIN=build-device/bench/gpu/flashattn-gpu-bench
  MAIN_BIN=build-device/apps/flashattn-bench
  LIBS=""
fi
# Our binaries (only they) see the carried libraries.
run_ours() { LD_LIBRARY_PATH=${LIBS:+$LIBS:}${LD_LIBRARY_PATH:-} "$@"; }
cat > /tmp/flashattn-gpu-bench.sh <<WRAP
#!/usr/bin/env bash
LD_LIBRARY_PATH=${LIBS:+$LIBS:}\${LD_LIBRARY_PATH:-} exec "$BENCH_BIN" "\$@"
WRAP
chmod +x /tmp/flashattn-gpu-bench.sh

echo "== GPU tests"
run_ours "$TESTS" 2>&1 > "$OUT/tests.log"
echo "tests exit code $?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[summary\]|tests ran" "$OUT/tests.log" | tail -40

echo "== flashattn-bench, default problem (picks the GPU), checked against the oracle"
run_ours "$MAIN_BIN" 2>&1 | tee "$OUT/main-bench.log"
echo "flashattn-bench exit code ${PIPESTATUS[0]}"

if [[ $MODE != quick ]]; then
  echo "== compute-sanitizer memcheck (subset)"
  run_ours compute-sanitizer --tool memcheck --error-exitcode 3 "$TESTS" \
    --gtest_filter='Grid/CudaForward.MatchesOracle/d64_*:Grid/CudaForward.MatchesOracle/d256_*:Grid/CudaForward.MatchesOracle/d40_*:Grid/CudaForward.MatchesOracle/varlen_*:Grid/CudaForward.MatchesOracle/causal_sq_gt_sk_empty_rows:CudaMerge.*:CudaErrors.*' \
    > "$OUT/sanitizer.log" 2>&1
  echo "memcheck exit code $?"
  grep -E "ERROR SUMMARY|^\[  (PASSED|FAILED) " "$OUT/sanitizer.log" | tail -5
  echo "== compute-sanitizer racecheck (one case)"
  run_ours compute-sanitizer --tool racecheck --error-exitcode 3 "$TESTS" \
    --gtest_filter='Grid/CudaForward.MatchesOracle/causal_sq_gt_sk_empty_rows:Grid/CudaForward.MatchesOracle/varlen_bf16_softcap_alibi_d96' \
    > /tmp/racecheck.log 2>&1
  echo "racecheck exit code $?"
  cat /tmp/racecheck.log >> "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^\[  (PASSED|FAILED) " /tmp/racecheck.log | tail -5
fi

echo "== benchmark"
python3 bench/gpu/bench_sdpa.py --ours /tmp/flashattn-gpu-bench.sh --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "== benchmark, other head dims"
python3 bench/gpu/bench_sdpa.py --ours /tmp/flashattn-gpu-bench.sh --out "$OUT" --name bench-extra \
  --head-dims 96,192,256 --seqlens 2048,8192 2>&1 | tee -a "$OUT/bench.log"
