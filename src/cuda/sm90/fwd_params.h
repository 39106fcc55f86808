// What the sm90 forward kernel receives (one __grid_constant__ struct): four TMA tensor maps
// built on the host (tensor_map.h) and the scalars of a fixed-length batch.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only)

#include <cstdint>


namespace flashattn::cuda::sm90 {

struct FwdParams {
  // (head dim, rows, heads, batch) views of q, k, v and out; boxes of 64 columns x the tile's rows.
  CUtensorMap tma_q;
  CUtensorMap tma_k;
  CUtensorMap tma_v;
  CUtensorMap tma_o;  // box rows = 64: each consumer warpgroup stores its own rows

  float* lse;  // lse[b * lse_batch_stride + h * lse_head_stride + i]
  int64_t lse_batch_stride, lse_head_stride;

  int seqlen_q, seqlen_k;  // every sequence of the batch
  int heads, group;        // query heads, query heads per kv head
  int m_blocks;            // query blocks per (sequence, head)
  int tiles;               // m_blocks * heads * batch: the work items of the persistent grid
  // -1 = unbounded; causal is (-1 or left, 0). Clamped to seqlen_q + seqlen_k on the host, and
  // seqlen_q + seqlen_k < 2^30 (dispatch.cpp), so the key bounds below stay in int.
  int window_left, window_right;
  float scale_log2;  // softmax_scale * log2(e) > 0

  // Visible keys of query row i are [key_begin(i), key_end(i)): core/mask.h's Mask in int
  // arithmetic (bottom-right aligned diagonal i + seqlen_k - seqlen_q).
  __device__ int key_begin(int i) const {
    return window_left < 0 ? 0 : min(max(i + seqlen_k - seqlen_q - window_left, 0), seqlen_k);
  }
  __device__ int key_end(int i) const {
    return window_right < 0 ? seqlen_k : min(max(i + seqlen_k - seqlen_q + window_right + 1, 0), seqlen_k);
  }
  // Every row of [r0, r1) sees every key of [c0, c1): the block needs no mask.
  __device__ bool block_fully_visible(int r0, int r1, int c0, int c1) const {
    return c0 >= key_begin(r1 - 1) && c1 <= key_end(r0);
  }
};

}  // namespace flashattn::cuda::sm90
