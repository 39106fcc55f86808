// The fp32 workspace of the backward (sm80 and sm90 kernels) and the scalars its three kernels share
// (preprocess -> main -> postprocess, all on the caller's stream).
//
// Per query head the workspace holds `ws_rows` rows: sequence b's query block m lives at rows
// ws_row0(b) + m * block_m + [0, block_m), so every block of every sequence is a whole, aligned,
// in-bounds slab (the loads and atomics need no bounds checks). ws_row0(b) =
// floor((first packed row of b + block_m * b) / block_m) * block_m: consecutive sequences never
// overlap (the + block_m * b leaves room for each one's rounding), and all of them fit in
// total_q + block_m * batch rows.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/params.h"
#include "flashattn/error.h"

namespace flashattn::cuda {

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

  // The scalars for blocks of block_m query rows and block_n keys; throws when a grid would pass
  // 2^31 - 1 blocks. The workspace pointers stay null (carve()).
  static BwdArgs plan(const BwdParams& p, int block_m, int block_n, float log2e) {
    BwdArgs args;
    args.group = p.heads / p.heads_k;
    args.block_m = block_m;
    args.scale_log2 = p.scale * log2e;
    const int64_t n_blocks = (p.seqlen_k + block_n - 1) / block_n;
    const int64_t m_blocks = (p.seqlen_q + block_m - 1) / block_m;
    if (n_blocks * p.heads_k * p.batch > INT_MAX)
      throw Unsupported("flashattn: CUDA backward: " + std::to_string(n_blocks * p.heads_k * p.batch) +
                        " key blocks (seqlen_k / " + std::to_string(block_n) +
                        " x heads_k x batch) exceed the grid limit of 2^31 - 1");
    if (m_blocks * p.heads * p.batch > INT_MAX)
      throw Unsupported("flashattn: CUDA backward: " + std::to_string(m_blocks * p.heads * p.batch) +
                        " query blocks (seqlen_q / " + std::to_string(block_m) +
                        " x heads x batch) exceed the grid limit of 2^31 - 1");
    args.n_blocks = int(n_blocks);
    args.m_blocks = int(m_blocks);
    args.ws_rows = (p.total_q + int64_t(block_m) * p.batch + block_m - 1) / block_m * block_m;
    return args;
  }

  // Workspace bytes: dQ accumulator, LSE*log2e, D, and the deterministic mode's counters. Every part
  // is a multiple of 256 bytes (ws_rows is a multiple of block_m >= 64), so each starts 16-byte
  // aligned.
  size_t accum_bytes(const BwdParams& p, int head_dim) const {
    return size_t(p.heads) * size_t(ws_rows) * size_t(head_dim) * sizeof(float);
  }
  size_t row_bytes(const BwdParams& p) const { return size_t(p.heads) * size_t(ws_rows) * sizeof(float); }
  size_t semaphore_bytes(const BwdParams& p) const {
    return p.deterministic ? size_t(p.batch) * p.heads * size_t(m_blocks) * sizeof(int) : 0;
  }
  size_t workspace_bytes(const BwdParams& p, int head_dim) const {
    return accum_bytes(p, head_dim) + 2 * row_bytes(p) + semaphore_bytes(p);
  }
  // Points the workspace parts into `base` (workspace_bytes long); the counters still need zeroing.
  void carve(const BwdParams& p, int head_dim, char* base) {
    dq_accum = reinterpret_cast<float*>(base);
    lse2 = reinterpret_cast<float*>(base + accum_bytes(p, head_dim));
    delta = reinterpret_cast<float*>(base + accum_bytes(p, head_dim) + row_bytes(p));
    dq_semaphore = p.deterministic
                       ? reinterpret_cast<int*>(base + accum_bytes(p, head_dim) + 2 * row_bytes(p))
                       : nullptr;
  }
};

}  // namespace flashattn::cuda
