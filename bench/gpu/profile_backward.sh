#!/usr/bin/env bash
# ncu of one backward main-kernel launch (sm90 or sm80, whichever the dispatch runs; FLASHATTN_CUDA_BACKWARD
# picks) each for d = 64 and 128 (non-causal, seqlen 8192, 16k tokens), run from a folder holding
# flashattn-gpu-bench and lib.tar.xz. Reports go to $OUT.
cd "$(dirname "$0")"
[[ -d lib ]] || tar -xJf lib.tar.xz
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-.}
for d in 64 128; do
  timeout ${NCU_TIMEOUT:-60} ncu --kernel-name "regex:flash_bwd_(sm90_)?kernel" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section InstructionStats \
      ./flashattn-gpu-bench --backward --warmup 0 --iters 1 --case 2,8192,$((2048 / d)),$d,0 > "$OUT/ncu-bwd-d$d.txt" 2>&1
  echo "d=$d rc=$?"
  grep -iE "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc|Shared Memory|Bank|No Eligible|Warp Cycles Per Issued|Stall|L1/TEX Hit|L2 Hit|Tensor|Pipe" "$OUT/ncu-bwd-d$d.txt" | head -40
done
