// The sm80 forward instantiations, one per (head dim, dtype), defined in src/cuda/inst/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/params.h"

namespace flashattn::cuda::sm80 {

// Runs the forward on `device` (already current) for head dims up to kHeadDim (q/k and v
// columns beyond the real head dims are zero-filled on load and never stored). Both split the
// keys (split-KV + merge) when options.num_splits asks or the heuristic finds the GPU underfilled.
template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, int device, cudaStream_t stream);

// The decode kernel: query heads of a kv head packed into the rows of one m16 tile, K/V streamed
// once per tile. For problems with few packed rows (see kDecodeMaxPackedRows).
template <int kHeadDim, typename T>
void run_decode(const AttnParams& p, int device, cudaStream_t stream);

// Up to this many packed rows (seqlen_q x query heads per kv head) the decode kernel runs: its
// m16 tiles of one (sequence, kv head) re-read the same K/V, mostly from L2; beyond, the main
// kernel's 128-row tiles read K/V less often.
constexpr int64_t kDecodeMaxPackedRows = 64;

}  // namespace flashattn::cuda::sm80
