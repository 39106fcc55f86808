#!/usr/bin/env bash
# The backward's GPU session in one call, run from a folder that holds prebuilt binaries
# (flashattn_cuda_tests, flashattn-gpu-bench, lib.tar.xz with the shared libraries they need) and
# bench_sdpa.py:
#   bash run_backward.sh [tests|sanitize|bench|all ...]   (default: all)
# Stages run in this order: tests, bench, compare, sanitize.
# tests     the backward GPU tests, 8 shards in parallel (the fp64 oracle on the CPU dominates)
# sanitize  compute-sanitizer memcheck on small backward cases, racecheck on one
# bench     bench_sdpa.py --bwd --ours-sm80: ours (as dispatched, and the sm80 kernel) vs SDPA flash /
#           cuDNN backward, d 64/128, seqlen 1k-16k, causal and not; then ours deterministic at 8k
# compare   flashattn-gpu-bench against flashattn-gpu-bench-alt (a build with other tiles, when
#           present), alternating, on $COMPARE_CASES
# Logs and tables go to $OUT (default ./out). Each stage has its own time limit so that the later
# ones still run.
set -uo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$DIR/out}
mkdir -p "$OUT"
cd "$DIR"
[[ -d lib ]] || tar -xJf lib.tar.xz
export LD_LIBRARY_PATH=$DIR/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
STAGES=${*:-all}
want() { [[ " $STAGES " == *" $1 "* || " $STAGES " == *" all "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if want tests; then
  echo "== backward GPU tests (8 shards)"
  export OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2  # the baseline's BLAS: 8 processes share the CPUs
  for i in 0 1 2 3 4 5 6 7; do
    GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout ${TEST_TIMEOUT:-150} ./flashattn_cuda_tests \
      --gtest_filter="${TEST_FILTER:-*Backward*}" > "$OUT/tests.$i.log" 2>&1 &
  done
  wait
  cat "$OUT"/tests.*.log > "$OUT/tests.log"
  grep -hE "^\[  (PASSED|FAILED) " "$OUT"/tests.*.log
  grep -hE "^\[  FAILED  \].*\(" "$OUT"/tests.*.log | head -40
  grep -hE -B2 -A12 "Failure$" "$OUT/tests.log" | head -150
fi

if want bench; then
  echo "== backward benchmark"
  timeout ${BENCH_TIMEOUT:-150} python3 bench_sdpa.py --ours ./flashattn-gpu-bench --out "$OUT" --bwd --ours-sm80 --name bench-bwd \
    --seqlens ${SEQLENS:-1024,2048,4096,8192,16384} --warmup 3 --iters 10 2>&1 | tail -30
  echo "== ours, deterministic, 8k"
  timeout 30 ./flashattn-gpu-bench --backward --deterministic --warmup 3 --iters 10 \
    --case 2,8192,32,64,0 --case 2,8192,32,64,1 --case 2,8192,16,128,0 --case 2,8192,16,128,1 2>&1 | tee "$OUT/bench-det.log"
fi

if want compare && [[ -x ./flashattn-gpu-bench-alt ]]; then
  echo "== tiles: default vs alt (backward)"
  CASES=${COMPARE_CASES:-"4,4096,32,64,0 4,4096,32,64,1 2,8192,32,64,0 2,8192,32,64,1"}
  args=()
  for c in $CASES; do args+=(--case "$c"); done
  for rep in 1 2; do
    for bin in flashattn-gpu-bench flashattn-gpu-bench-alt; do
      timeout 60 ./$bin --backward --warmup 3 --iters 10 "${args[@]}" | sed "s/^/$bin: /" | tee -a "$OUT/compare.log"
    done
  done
fi

if want sanitize; then
  echo "== compute-sanitizer memcheck (small backward cases)"
  timeout ${SAN_TIMEOUT:-100} compute-sanitizer --tool memcheck --error-exitcode 3 ./flashattn_cuda_tests \
    --gtest_filter='Grid/CudaBackward.MatchesOracle/causal_sq_gt_sk_empty_rows:Grid/CudaBackward.MatchesOracle/window_empty_rows:Grid/CudaBackward.MatchesOracle/d40_sq65_sk63*:Grid/CudaBackward.MatchesOracle/varlen_fp16_window_bhsd:Grid/CudaBackward.MatchesOracle/no_*:Grid/CudaBackward.MatchesOracle/d96_sq65_sk63*:Grid/CudaBackward.MatchesOracle/d256_sq1_sk64*:Grid/CudaBackward.MatchesOracle/multiblock_d64_window_fp16:CudaBackwardErrors.*' \
    > "$OUT/memcheck.log" 2>&1
  echo "memcheck exit code $?"
  grep -E "ERROR SUMMARY|^\[  (PASSED|FAILED) " "$OUT/memcheck.log" | tail -5
  grep -m5 -A8 "Invalid\|out of bounds" "$OUT/memcheck.log"
  echo "== compute-sanitizer racecheck (one case)"
  timeout ${SAN_TIMEOUT:-100} compute-sanitizer --tool racecheck --error-exitcode 3 ./flashattn_cuda_tests \
    --gtest_filter='Grid/CudaBackward.MatchesOracle/causal_sq_gt_sk_empty_rows:Grid/CudaBackward.MatchesOracle/multiblock_d96_causal_sq_gt_sk_mqa' > "$OUT/racecheck.log" 2>&1
  echo "racecheck exit code $?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^\[  (PASSED|FAILED) " "$OUT/racecheck.log" | tail -5
  grep -m5 -A6 "hazard" "$OUT/racecheck.log"
fi
