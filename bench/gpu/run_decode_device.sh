#!/usr/bin/env bash
# The split-KV / decode GPU session in one call, on the device machine:
#   bash run_decode_device.sh DIR
# DIR holds prebuilt binaries (flashattn_cuda_tests, flashattn-gpu-bench, optionally
# flashattn-gpu-bench-base: the same bench built from the branch point, for an A/B of the
# un-split forward), lib.tar.xz (shared libraries of the tests) and the bench scripts
# bench_decode.py / bench_sdpa.py. Steps, each logged under $OUT:
#   1. all GPU tests                                                               (checks.log)
#   2. bench_decode.py: decode TB/s vs SDPA flash / cuDNN / efficient + num_splits sweep (decode.*)
#   3. bench_sdpa.py at seqlen 8k, d 64/128: the un-split forward, ours (and base) vs SDPA (prefill*)
#   4. compute-sanitizer memcheck + racecheck on the split-KV / seqused_k tests      (checks.log)
#   5. the acceptance shapes timed again; ncu of one decode step (b1, 32k keys): decode kernel + merge (ncu.txt)
# The most important results come first: a step cut off by the call's time limit loses the least.
set -uo pipefail
DIR=$(cd "${1:?usage: run_decode_device.sh DIR}" && pwd)
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$DIR"
[[ -d lib || ! -f lib.tar.xz ]] || tar -xJf lib.tar.xz
export LD_LIBRARY_PATH=$DIR/lib:${LD_LIBRARY_PATH:-}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== GPU tests"
timeout 90 ./flashattn_cuda_tests > "$OUT/checks.log" 2>&1
echo "tests exit code $?"
grep -E "^\[  (PASSED|FAILED) |^\[summary\]| tests ran" "$OUT/checks.log" | tail -30

echo "== decode benchmark"
timeout 120 python3 bench_decode.py --ours ./flashattn-gpu-bench --out "$OUT" 2> "$OUT/decode.err"
echo "decode bench exit code $?"
tail -5 "$OUT/decode.err"

echo "== un-split forward, seqlen 8k (ours$([[ -x flashattn-gpu-bench-base ]] && echo ', then the branch point'))"
timeout 45 python3 bench_sdpa.py --ours ./flashattn-gpu-bench --out "$OUT" --name prefill --seqlens 8192
if [[ -x flashattn-gpu-bench-base ]]; then
  echo "-- A/B, alternating: base, ours, base, ours (d 64 and 128, non-causal 8k, TFLOP/s)"
  for bin in flashattn-gpu-bench-base flashattn-gpu-bench flashattn-gpu-bench-base flashattn-gpu-bench; do
    timeout 30 ./$bin --warmup 5 --iters 30 --case 2,8192,32,64,0 --case 2,8192,16,128,0 | python3 -c "import sys, json
print('$bin', ' '.join('d%d %.1f' % (r['head_dim'], r['tflops']) for r in map(json.loads, sys.stdin)))"
  done
fi

echo "== compute-sanitizer memcheck (split-KV tests)"
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 ./flashattn_cuda_tests \
  --gtest_filter='SplitKV/*:CudaSplitKV.*:CudaMerge.*:Grid/CudaForward.MatchesOracle/varlen_*' > /tmp/memcheck.log 2>&1
echo "memcheck exit code $?"
cat /tmp/memcheck.log >> "$OUT/checks.log"
grep -E "ERROR SUMMARY|^\[  (PASSED|FAILED) " /tmp/memcheck.log | tail -5
echo "== compute-sanitizer racecheck (decode kernel, main split kernel)"
timeout 30 compute-sanitizer --tool racecheck --error-exitcode 3 ./flashattn_cuda_tests \
  --gtest_filter='SplitKV/CudaForward.MatchesOracle/decode_sq7_group8_window_splits5:SplitKV/CudaForward.MatchesOracle/main_causal_sq129_splits3:SplitKV/CudaForward.MatchesOracle/decode_gqa4_sk1013_splits1' \
  > /tmp/racecheck.log 2>&1
echo "racecheck exit code $?"
cat /tmp/racecheck.log >> "$OUT/checks.log"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^\[  (PASSED|FAILED) " /tmp/racecheck.log | tail -5

echo "== decode, the acceptance shapes again (ours only: the spread between two timings)"
timeout 30 ./flashattn-gpu-bench --warmup 10 --iters 50 --rotate-kv --case 1,32768,32,128,0,8,1,0 \
  --case 16,131072,32,128,0,8,1,0 | python3 -c "import sys, json
for l in sys.stdin: r = json.loads(l); print(r['batch'], r['seqlen'], r['num_splits'], '%.1f us' % (r['ms'] * 1e3), '%.3f TB/s' % r['tbps'])"

echo "== ncu: decode b1 32k (decode kernel, then the merge)"
timeout 40 ncu --kernel-name regex:"flash_decode|merge" --launch-skip 6 --launch-count 2 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  ./flashattn-gpu-bench --warmup 3 --iters 2 --rotate-kv --case 1,32768,32,128,0,8,1,0 > "$OUT/ncu.txt" 2>&1
echo "ncu exit code $?"
grep -E "^  [a-z_]+.*\(|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Grid Size|Waves|SM Active" "$OUT/ncu.txt" | head -30
