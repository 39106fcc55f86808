#!/usr/bin/env bash
# The one device script: everything a change needs on the GPU machine, in calls that each fit the
# device's time limit.
#   bash bench/gpu/run_device.sh check [DIR]    GPU tests, sanitizers, flashattn-bench, the Python package
#   bash bench/gpu/run_device.sh bench [DIR]    forward / backward / decode vs PyTorch SDPA (flash, cuDNN),
#                                              interleaved per shape; a baseline commit beside ours
#   bash bench/gpu/run_device.sh profile [DIR]  ncu of the forward and backward main kernels
#   modes combine: tests,bench,workloads,overhead,context_parallel (GPU tests only; packed documents,
#   softcap + window and ALiBi against the sm80 kernels; the Python call overhead; ring attention on
#   one GPU against plain attention)
# DIR (default build-carry/) holds what bench/gpu/pack_carry.sh put there: flashattn_cuda_tests,
# flashattn-gpu-bench, flashattn-bench, lib.tar.xz (the shared libraries they need: OpenBLAS for
# the oracle) and COMMIT; optionally base-src.tar.gz (git archive of a baseline commit), which
# `bench` builds here (the library and flashattn-gpu-bench need no BLAS) and times beside ours.
# Everything is logged under $OUT (default ./device-out); the most important step runs first, so a
# call cut off by its limit loses the least.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=${1:?usage: run_device.sh check|bench|profile [DIR]}
DIR=$(cd "${2:-build-carry}" && pwd)
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[[ -d $DIR/lib || ! -f $DIR/lib.tar.xz ]] || tar -xJf "$DIR/lib.tar.xz" -C "$DIR"
# The binaries travel compressed (the call carries at most 64 MiB; each holds every kernel).
[[ -x $DIR/flashattn_cuda_tests || ! -f $DIR/bins.tar.xz ]] || tar -xJf "$DIR/bins.tar.xz" -C "$DIR"
export LD_LIBRARY_PATH=$DIR/lib:${LD_LIBRARY_PATH:-}
TESTS=$DIR/flashattn_cuda_tests
GPU_BENCH=$DIR/flashattn-gpu-bench
# The image's default compiler links libstdc++ statically; builds here use the system one.
CMAKE_HOST=(-DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++)

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
  nvcc --version | tail -1
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
  echo "binaries built from commit $(cat "$DIR/COMMIT" 2>/dev/null || echo unknown)"; } > "$OUT/env-${MODE//,/-}.txt" 2>&1
cat "$OUT/env-${MODE//,/-}.txt"

tests() {
  echo "== GPU tests (all)"
  timeout 240 "$TESTS" > "$OUT/tests.log" 2>&1
  echo "tests exit code $?"
  grep -E "^\[  (PASSED|FAILED) |^\[  SKIPPED \] [0-9]| tests ran" "$OUT/tests.log" | tail -25
}

check() {
  tests

  echo "== the backward grid again on the sm80 kernel (FLASHATTN_CUDA_BACKWARD=sm80; 8 shards)"
  for i in 0 1 2 3 4 5 6 7; do
    FLASHATTN_CUDA_BACKWARD=sm80 OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i \
      timeout 150 "$TESTS" --gtest_filter='*CudaBackward*' > "$OUT/tests-bwd-sm80.$i.log" 2>&1 &
  done
  wait
  cat "$OUT"/tests-bwd-sm80.*.log > "$OUT/tests-bwd-sm80.log" && rm -f "$OUT"/tests-bwd-sm80.*.log
  grep -E "^\[  (PASSED|FAILED) " "$OUT/tests-bwd-sm80.log" | sort | uniq -c

  echo "== flashattn-bench, default problem (picks the GPU), checked against the oracle"
  timeout 60 "$DIR/flashattn-bench" 2>&1 | tee "$OUT/main-bench.log"
  echo "flashattn-bench exit code ${PIPESTATUS[0]}"

  echo "== compute-sanitizer memcheck (a small subset of every kernel family)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$TESTS" \
    --gtest_filter='Grid/CudaForward.MatchesOracle/d64_*:Grid/CudaForward.MatchesOracle/d40_*:Grid/CudaForward.MatchesOracle/varlen_*:Grid/CudaForward.MatchesOracle/causal_sq_gt_sk_empty_rows:SplitKV/*decode*:CudaMerge.*:CudaErrors.*:Grid/CudaBackward.MatchesOracle/causal_sq_gt_sk_empty_rows:Grid/CudaBackward.MatchesOracle/d40_sq65_sk63*:Grid/CudaBackward.MatchesOracle/varlen_fp16_window_bhsd:Grid/CudaBackward.MatchesOracle/d256_sq1_sk64*:CudaBackwardErrors.*:Cases/CudaKVCache.*:CudaCheckLengths.*' \
    > "$OUT/sanitizer.log" 2>&1
  echo "memcheck exit code $?"
  grep -E "ERROR SUMMARY|^\[  (PASSED|FAILED) " "$OUT/sanitizer.log" | tail -4
  echo "== compute-sanitizer racecheck (forward, split-KV decode, backward)"
  timeout 90 compute-sanitizer --tool racecheck --error-exitcode 3 "$TESTS" \
    --gtest_filter='Grid/CudaForward.MatchesOracle/causal_sq_gt_sk_empty_rows:SplitKV/CudaForward.MatchesOracle/decode_sq7_group8_window_splits5:Grid/CudaBackward.MatchesOracle/causal_sq_gt_sk_empty_rows:Cases/CudaKVCache.MatchesOracle/paged16_batch_idx_leftpad_sinks:Cases/CudaKVCache.MatchesOracle/paged3_chunk_fwd_kernel_rotary' \
    > /tmp/racecheck.log 2>&1
  echo "racecheck exit code $?"
  cat /tmp/racecheck.log >> "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^\[  (PASSED|FAILED) " /tmp/racecheck.log | tail -4

  [[ ${SKIP_PYTHON:-0} == 1 ]] && { echo "== Python package skipped (SKIP_PYTHON=1)"; return; }
  echo "== Python package: build + install with CUDA, drop-in script, overhead, pytest"
  python_package || return
  (cd tests/python && timeout 60 python3 test_dropin.py) 2>&1 | tail -5
  overhead
  local start=$SECONDS
  (cd /tmp && OMP_NUM_THREADS=2 FLASHATTN_EXPLAIN_LOG="$OUT/explain.txt" timeout 300 python3 -m pytest \
     "$ROOT/tests/python" -q -p no:cacheprovider -n 8 -rs 2>&1 | grep -v '^\[transformers\]' > "$OUT/pytest.txt")
  echo "pytest in $((SECONDS - start)) s"
  tail -25 "$OUT/pytest.txt"
  grep -E "Graph Count|Graph Break Count" "$OUT/explain.txt" 2>/dev/null | sort | uniq -c
}

# The Python package with CUDA, installed into the image's python3 (once per machine).
python_package() {
  python3 -c "import flashattn, sys; sys.exit(0 if flashattn.cuda_available() else 1)" 2>/dev/null && return 0
  # The image's default compiler links libstdc++ statically, and the extension then crashes while
  # building a flashattn::Error message: build with the system compiler.
  local start=$SECONDS
  if ! FLASHATTN_CUDA=ON CMAKE_ARGS="-DFLASHATTN_CUDA_ARCHS=90a" CXX=/usr/bin/g++ CC=/usr/bin/gcc \
       CUDAHOSTCXX=/usr/bin/g++ CMAKE_BUILD_PARALLEL_LEVEL=16 \
       python3 -m pip install --no-build-isolation --no-deps --disable-pip-version-check . > "$OUT/pip.log" 2>&1; then
    tail -40 "$OUT/pip.log"
    echo "Python package build FAILED"
    return 1
  fi
  echo "build + install: $((SECONDS - start)) s"
}

# Python's host time per call over the C++ launch (batch 1, one query, 4k keys).
overhead() {
  (cd /tmp && timeout 90 python3 "$ROOT/python/examples/overhead.py") 2>&1 | tee "$OUT/overhead.txt" | tail -16
}

# Ring attention on one GPU against plain attention (a 1-rank group; one rank of a simulated
# 8-rank ring), through the Python package.
context_parallel() {
  python_package || return
  echo "== context parallelism on one GPU"
  timeout 240 python3 bench/gpu/bench_context_parallel.py --modes 1rank sim --seqlens ${CP_SEQLENS:-16384 65536} \
    --json "$OUT/context-parallel.json" 2>&1 | tail -20
}

# The baseline commit's flashattn-gpu-bench, built here from DIR/base-src.tar.gz (sets BASE_ARGS).
BASE_ARGS=()
build_baseline() {
  [[ -f $DIR/base-src.tar.gz ]] || return
  local src=/tmp/base-src build=/tmp/base-build start=$SECONDS
  rm -rf "$src" "$build" && mkdir -p "$src" && tar -xzf "$DIR/base-src.tar.gz" -C "$src"
  if cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHATTN_CUDA=ON -DFLASHATTN_CUDA_ARCHS=90a \
       -DFLASHATTN_CUDA_HEAD_DIMS="64;128;256" -DFLASHATTN_BUILD_TESTS=OFF -DFLASHATTN_BUILD_APPS=OFF \
       -DFLASHATTN_BUILD_PYTHON=OFF "${CMAKE_HOST[@]}" > "$OUT/base-build.log" 2>&1 &&
     timeout 240 cmake --build "$build" -j"$(nproc)" --target flashattn-gpu-bench >> "$OUT/base-build.log" 2>&1; then
    BASE_ARGS=(--baseline "$build/bench/gpu/flashattn-gpu-bench")
    echo "baseline built in $((SECONDS - start)) s"
  else
    tail -20 "$OUT/base-build.log"
    echo "baseline build FAILED: tables without it"
  fi
}

# PASSES (default forward,backward,decode) picks the tables; BWD_SM80=0 leaves the sm80 backward
# column out (with a baseline it doubles the backward's time).
want() { [[ ,${PASSES:-forward,backward,decode}, == *,$1,* ]]; }
bench() {
  build_baseline
  want forward && echo "== forward vs SDPA (16k tokens, dim 2048, bf16)" &&
  timeout 420 python3 bench/gpu/bench_sdpa.py --ours "$GPU_BENCH" --ours-sm80 "${BASE_ARGS[@]}" --out "$OUT" \
    --name forward --head-dims 64,128,256 --seqlens ${SEQLENS:-512,1024,2048,4096,8192,16384} 2>&1 | tail -45
  local sm80=(--ours-sm80)
  [[ ${BWD_SM80:-1} == 0 ]] && sm80=()
  want backward && echo "== backward vs SDPA" &&
  timeout 300 python3 bench/gpu/bench_sdpa.py --ours "$GPU_BENCH" --bwd "${sm80[@]}" "${BASE_ARGS[@]}" --out "$OUT" \
    --name backward --head-dims 64,128 --seqlens ${SEQLENS_BWD:-1024,2048,4096,8192,16384} 2>&1 | tail -25
  want decode && echo "== decode vs SDPA (TB/s)" &&
  timeout 150 python3 bench/gpu/bench_decode.py --ours "$GPU_BENCH" "${BASE_ARGS[@]}" --out "$OUT" 2>&1 | tail -20
}

# Packed documents, softcap + window, ALiBi: forward and backward, ours (sm90 where covered) beside
# the sm80 kernels forced, and the baseline when one was built (bench_workloads.py).
workloads() {
  [[ ${#BASE_ARGS[@]} -gt 0 ]] || build_baseline
  for pass in fwd bwd; do
    echo "== workloads, $pass"
    local flag=()
    [[ $pass == bwd ]] && flag=(--bwd)
    timeout 240 python3 bench/gpu/bench_workloads.py --ours "$GPU_BENCH" "${BASE_ARGS[@]}" "${flag[@]}" --out "$OUT" \
      --name "workloads-$pass" 2>&1 | tail -14
  done
}

profile() {
  echo "== ncu: one launch of each main kernel (16k tokens, seqlen 8192, non-causal)"
  for pass in forward backward; do
    for d in 64 128; do
      local flag=() regex="flash_fwd_(sm90_)?kernel"
      [[ $pass == backward ]] && flag=(--backward) regex="flash_bwd_(sm90_)?kernel"
      timeout ${NCU_TIMEOUT:-60} ncu --kernel-name "regex:$regex" --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section InstructionStats \
        "$GPU_BENCH" "${flag[@]}" --warmup 0 --iters 1 --case 2,8192,$((2048 / d)),$d,0 > "$OUT/ncu-$pass-d$d.txt" 2>&1
      echo "$pass d$d: ncu exit code $?"
      grep -iE "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Stall|Tensor|Pipe" \
        "$OUT/ncu-$pass-d$d.txt" | head -25
    done
  done
}

# MODE: one or more of check, tests, bench, profile, overhead, context_parallel (comma-separated).
for mode in ${MODE//,/ }; do
  case $mode in
    check) check ;;
    tests) tests ;;
    bench) bench ;;
    workloads) workloads ;;
    profile) profile ;;
    overhead) python_package && overhead ;;
    context_parallel) context_parallel ;;
    *) echo "usage: run_device.sh check|tests|bench|workloads|profile|overhead|context_parallel[,...] [DIR]"; exit 2 ;;
  esac
done
