// The fp32 workspace of the sm80 backward and the scalars its three kernels share
// (preprocess -> main -> postprocess, all on the caller's stream).
//
// Per query head the workspace holds `ws_rows` rows: sequence b's query block m lives at rows
// ws_row0(b) + m * block_m + [0, block_m), so every block of every sequence is a whole, aligned,
// in-bounds slab (the loads and atomics need no bounds checks). ws_row0(b) =
// floor((first packed row of b + block_m * b) / block_m) * block_m: consecutive sequences never
// overlap (the + block_m * b leaves room for each one's rounding), and all of them fit in
// total_q + block_m * batch rows.
#pragma once

#include <cstdint>

#include "core/params.h"

namespace flashattn::cuda::sm80 {

struct BwdArgs {
  int group = 1;         // query heads per kv head
  int n_blocks = 0;      // key blocks per (sequence, kv head): the main kernel's CTAs
  int m_blocks = 0;      // query blocks per (sequence, head) of the longest sequence
  int block_m = 0;       // query rows per block (the main kernel's)
  float scale_log2 = 0;  // softmax_scale * log2(e)
  int64_t ws_rows = 0;   // workspace rows per head

  float* dq_accum = nullptr;  // [heads][ws_rows][kHeadDim]: dQ / softmax_scale, summed over key blocks
  float* lse2 = nullptr;      // [heads][ws_rows]: LSE * log2(e); +inf where a row sees no key or is padding
  float* delta = nullptr;     // [heads][ws_rows]: D = rowsum(dO * O); 0 on padding rows
  int* dq_semaphore = nullptr;  // [batch][heads][m_blocks]: key blocks added so far (deterministic mode)

  FA_HOST_DEVICE int64_t ws_row0(const BwdParams& p, int b) const {
    const int64_t first = p.cu_seqlens_q ? int64_t(p.cu_seqlens_q[b]) : int64_t(b) * p.seqlen_q;
    return (first + int64_t(block_m) * b) / block_m * block_m;
  }
  // Row 0 of query block m0 / block_m of sequence b for head h, as an index into lse2 / delta.
  FA_HOST_DEVICE int64_t ws_index(const BwdParams& p, int b, int h, int64_t m0) const {
    return h * ws_rows + ws_row0(p, b) + m0;
  }
};

}  // namespace flashattn::cuda::sm80
