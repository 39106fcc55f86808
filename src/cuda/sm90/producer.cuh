// The producer warpgroup of the sm90 forward: one thread issues every TMA copy of the CTA.
// Q once, then for each visible key block (last first, the order the consumers take them) K and
// V into the next ring stage, each after the consumers released that stage.
#pragma once

#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/smem.cuh"

namespace flashattn::cuda::sm90 {

// The CTA's work: query block, head, sequence, and the key blocks [n_begin, n_end) it visits.
struct BlockCoord {
  int m_block, h, b, hk;
  int n_begin, n_end;
  int m0;    // first query row of the block
  int rows;  // valid query rows of the block (<= kBlockM)
};

template <typename Tr>
__device__ __forceinline__ void produce(const FwdParams& p, const SmemView<Tr>& smem, const BlockCoord& c) {
  ptx::prefetch_tensor_map(&p.tma_q);
  ptx::prefetch_tensor_map(&p.tma_k);
  ptx::prefetch_tensor_map(&p.tma_v);

  ptx::mbarrier_arrive_expect_tx(smem.full_q(), Tr::kQBytes);
#pragma unroll
  for (int ch = 0; ch < Tr::kChunks; ++ch)
    ptx::tma_load_4d(smem.q() + ch * Tr::kQChunkBytes, &p.tma_q, ch * 64, c.m0, c.h, c.b, smem.full_q());

  int it = 0;
  for (int n = c.n_end - 1; n >= c.n_begin; --n, ++it) {
    const Slot<Tr> slot = Slot<Tr>::of(it);
    const int key0 = n * Tr::kBlockN;
    // A fresh barrier has "completed" the phase of parity 1: the first lap does not wait.
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

}  // namespace flashattn::cuda::sm90
