// The producer warpgroup of the sm90 forward: one thread issues every TMA copy of the CTA. For
// each of the CTA's tiles: Q once the consumers freed the Q buffer, then for each visible key block
// (last first, the order the consumers take them) K and V into the next ring stage, each after the
// consumers released that stage. The ring runs on across tiles, so the next tile's first K/V
// blocks load while the current tile finishes.
#pragma once

#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/smem.cuh"
#include "cuda/sm90/tile_scheduler.cuh"

namespace flashattn::cuda::sm90 {

template <typename Tr>
__device__ __forceinline__ void produce(const FwdParams& p, const SmemView<Tr>& smem) {
  ptx::prefetch_tensor_map(&p.tma_q);
  ptx::prefetch_tensor_map(&p.tma_k);
  ptx::prefetch_tensor_map(&p.tma_v);

  int it = 0;          // key blocks loaded so far (ring position)
  uint32_t q_phase = 0;  // parity of the current tile's Q phase
  for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x, q_phase ^= 1) {
    const BlockCoord c = tile_coord<Tr>(p, tile);
    // A fresh barrier has "completed" the phase of parity 1: the first tile does not wait.
    ptx::mbarrier_wait(smem.empty_q(), q_phase ^ 1);
    if (!c.has_keys()) {  // the consumers only write O = 0; keep the phases in step
      ptx::mbarrier_arrive(smem.full_q());
      continue;
    }
    ptx::mbarrier_arrive_expect_tx(smem.full_q(), Tr::kQBytes);
#pragma unroll
    for (int ch = 0; ch < Tr::kChunks; ++ch)
      ptx::tma_load_4d(smem.q() + ch * Tr::kQChunkBytes, &p.tma_q, ch * 64, c.m0, c.h, c.b, smem.full_q());

    for (int n = c.n_end - 1; n >= c.n_begin; --n, ++it) {
      const Slot<Tr> slot = Slot<Tr>::of(it);
      const int key0 = n * Tr::kBlockN;
      ptx::mbarrier_wait(smem.empty_k(slot.stage), slot.phase ^ 1);
      ptx::mbarrier_arrive_expect_tx(smem.full_k(slot.stage), Tr::kKVBytes);
#pragma unroll
      for (int ch = 0; ch < Tr::kChunks; ++ch)
        ptx::tma_load_4d(smem.k(slot.stage) + ch * Tr::kKVChunkBytes, &p.tma_k, ch * 64, key0, c.hk, c.b,
                         smem.full_k(slot.stage));
      ptx::mbarrier_wait(smem.empty_v(slot.stage), slot.phase ^ 1);
      ptx::mbarrier_arrive_expect_tx(smem.full_v(slot.stage), Tr::kKVBytes);
#pragma unroll
      for (int ch = 0; ch < Tr::kChunks; ++ch)
        ptx::tma_load_4d(smem.v(slot.stage) + ch * Tr::kKVChunkBytes, &p.tma_v, ch * 64, key0, c.hk, c.b,
                         smem.full_v(slot.stage));
    }
  }
}

}  // namespace flashattn::cuda::sm90
