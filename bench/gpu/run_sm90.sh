#!/usr/bin/env bash
# One device call for the sm90 (Hopper) forward: tests on both kernels, a sanitizer pass, the
# benchmark against SDPA (flash, cuDNN) and our sm80 kernel, and the consumer schedules side by side.
#   bash bench/gpu/run_sm90.sh BIN_DIR [steps]
# BIN_DIR holds prebuilt flashattn_cuda_tests, flashattn-gpu-bench (built with
# FLASHATTN_SM90_ALL_SCHEDULES=ON for the schedule step), lib.tar.xz (shared libraries) and
# bench_sdpa.py. steps: a comma list of tests,tests80,memcheck,bench,bench256,schedules (default all),
# run in the order given.
# Logs go under $OUT (default ./device-out); the last lines printed are a summary.
set -uo pipefail
BIN=$(cd "$1" && pwd)
STEPS=${2:-tests,tests80,memcheck,bench,bench256,schedules}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[[ -d $BIN/lib ]] || tar -xJf "$BIN/lib.tar.xz" -C "$BIN"
export LD_LIBRARY_PATH=$BIN/lib:${LD_LIBRARY_PATH:-}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"; } \
  > "$OUT/env.txt" 2>&1
head -3 "$OUT/env.txt"

step_tests() {
  echo "== GPU tests (dispatch picks sm90 where covered)"
  timeout 100 "$BIN/flashattn_cuda_tests" > "$OUT/tests.log" 2>&1
  local rc=$?
  note "tests (auto) exit $rc: $(grep -E '^\[  PASSED|^\[  FAILED  \] [0-9]+ test' "$OUT/tests.log" | tr '\n' ' ')"
  grep -E "^\[summary\]" "$OUT/tests.log" | tee -a "$SUMMARY"
  grep -E "^\[  FAILED  \] Grid|^\[  FAILED  \] Cuda" "$OUT/tests.log" | head -20 | tee -a "$SUMMARY"
  if [[ $rc == 124 ]]; then  # a hung kernel: the rest would hang too
    note "tests timed out in: $(grep '^\[ RUN' "$OUT/tests.log" | tail -1)"
    cat "$SUMMARY"
    exit 1
  fi
}
step_tests80() {
  echo "== GPU tests with FLASHATTN_CUDA_FORWARD=sm80"
  FLASHATTN_CUDA_FORWARD=sm80 timeout 100 "$BIN/flashattn_cuda_tests" > "$OUT/tests80.log" 2>&1
  note "tests (sm80 forced) exit $?: $(grep -E '^\[  PASSED|^\[  FAILED  \] [0-9]+ test' "$OUT/tests80.log" | tr '\n' ' ')"
  grep -E "^\[summary\]" "$OUT/tests80.log" | tee -a "$SUMMARY"
}
step_memcheck() {
  echo "== compute-sanitizer memcheck + synccheck on sm90 cases"
  F='Grid/CudaForward.MatchesOracle/multiblock_*:Grid/CudaForward.MatchesOracle/persistent_*:Grid/CudaForward.MatchesOracle/causal_sq_gt_sk_empty_rows:Grid/CudaForward.MatchesOracle/window_empty_rows:Grid/CudaForward.MatchesOracle/d64_*bhsd'
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/flashattn_cuda_tests" --gtest_filter="$F" \
    > "$OUT/memcheck.log" 2>&1
  note "memcheck exit $?: $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"
  timeout 60 compute-sanitizer --tool synccheck --error-exitcode 3 "$BIN/flashattn_cuda_tests" \
    --gtest_filter='Grid/CudaForward.MatchesOracle/multiblock_d128_causal_fp16:Grid/CudaForward.MatchesOracle/persistent_d64_empty_tiles_2ctas' > "$OUT/synccheck.log" 2>&1
  note "synccheck exit $?: $(grep -E 'ERROR SUMMARY' "$OUT/synccheck.log" | tail -1)"
}
step_bench() {
  echo "== benchmark d 64/128 vs SDPA and the sm80 kernel"
  timeout 200 python3 "$BIN/bench_sdpa.py" --ours "$BIN/flashattn-gpu-bench" --out "$OUT" --ours-sm80 \
    --seqlens 512,1024,2048,4096,8192,16384 2>&1 | tee "$OUT/bench.log" | tail -28
}
step_bench256() {
  echo "== benchmark d 256 (and 96, 192)"
  timeout 150 python3 "$BIN/bench_sdpa.py" --ours "$BIN/flashattn-gpu-bench" --out "$OUT" --ours-sm80 \
    --name bench-extra --head-dims 96,192,256 --seqlens 1024,4096,8192,16384 2>&1 | tee "$OUT/bench-extra.log" | tail -28
}
step_schedules() {
  echo "== consumer schedules and grids (ours only), bf16, TFLOP/s" | tee -a "$SUMMARY"
  CASES=(--case 32,512,32,64,0 --case 32,512,32,64,1 --case 16,1024,32,64,1 --case 4,4096,32,64,1
         --case 16,1024,16,128,1 --case 8,2048,32,64,0 --case 2,8192,32,64,0 --case 8,2048,16,128,0
         --case 2,8192,16,128,0 --case 2,8192,16,128,1 --case 1,16384,16,128,1 --case 4,4096,8,256,0
         --case 2,8192,8,256,1)
  # schedule:persistent (1 = one CTA per SM walking zig-zag rounds, 0 = one CTA per tile)
  for v in overlap:1 overlap:0 serial:1 pingpong:1 overlap:1; do
    IFS=: read -r s persist <<< "$v"
    FLASHATTN_SM90_SCHEDULE=$s FLASHATTN_SM90_PERSISTENT=$persist timeout 60 \
      "$BIN/flashattn-gpu-bench" --warmup 5 --iters 20 "${CASES[@]}" > "$OUT/variant.jsonl" 2>&1
    note "$s$([[ $persist == 0 ]] && echo ' one-CTA-per-tile' || echo ' persistent'): $(python3 -c "
import json,sys
for l in open('$OUT/variant.jsonl'):
    try: r = json.loads(l)
    except Exception: print(l.strip()); continue
    print(f\"d{r['head_dim']}{'c' if r['causal'] else ''}/{r['seqlen']} {r['tflops']:.0f}\", end='  ')
")"
  done
}
for step in ${STEPS//,/ }; do "step_$step"; done
echo "== summary"
cat "$SUMMARY"
