// What the sm90 forward kernel receives (one __grid_constant__ struct): four TMA tensor maps
// built on the host (tensor_map.h) and the scalars of a fixed-length batch.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only)

#include <cstdint>

#include "core/mask.h"

namespace flashattn::cuda::sm90 {

struct FwdParams {
  Mask32 mask;  // every sequence's: a fixed-length batch
  // (head dim, rows, heads, batch) views of q, k, v and out; boxes of 64 columns x the tile's rows.
  CUtensorMap tma_q;
  CUtensorMap tma_k;
  CUtensorMap tma_v;
  CUtensorMap tma_o;  // box rows = 64: each consumer warpgroup stores its own rows

  float* lse;  // lse[b * lse_batch_stride + h * lse_head_stride + i]
  int64_t lse_batch_stride, lse_head_stride;

  int heads, group;        // query heads, query heads per kv head
  int m_blocks;            // query blocks per (sequence, head)
  int tiles;               // m_blocks * heads * batch: the work items of the persistent grid
  float scale_log2;  // softmax_scale * log2(e) > 0

  // Softcap / ALiBi (the kScoreMod kernels only): the scores are scaled, modified and then taken
  // to the log2 domain, as core/mask.h's ScoreMod defines.
  float scale;
  float softcap;
  const float* alibi_slopes;
  int64_t alibi_batch_stride;

  __device__ ScoreMod score_mod(int b, int h) const {
    return ScoreMod::of(softcap, alibi_slopes, alibi_batch_stride, b, h);
  }
};

}  // namespace flashattn::cuda::sm90
