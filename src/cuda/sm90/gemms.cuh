// The two GEMMs of a consumer warpgroup, issued as wgmma (asynchronous: the caller fences,
// commits and waits, see fwd_kernel.cuh):
//   S (64 x kBlockN)  = Q (64 x d, this warpgroup's rows) K^T   A, B from smem, both K-major
//   O (64 x d)       += P (64 x kBlockN, registers) V           B from smem, MN-major (V rows as stored)
#pragma once

#include <cstdint>

#include "cuda/sm90/ptx.h"
#include "cuda/sm90/wgmma_ops.h"

namespace flashattn::cuda::sm90 {

// P in registers as the A operand of O += P V: one m16n8k16-style A fragment per k16 step.
template <typename Tr>
using PFragment = uint32_t[Tr::kBlockN / 16][4];

// smem_q_wg: this warpgroup's first Q row in chunk 0; smem_k: chunk 0 of the K stage.
template <typename Tr>
__device__ __forceinline__ void issue_qk(float (&s)[Tr::kBlockN / 2], uint32_t smem_q_wg, uint32_t smem_k) {
  using Mma = Wgmma<Tr::kBlockN, typename Tr::Element, 0>;
#pragma unroll
  for (int kk = 0; kk < Tr::kHeadDim / 16; ++kk) {
    // k16 step kk: chunk kk / 4, 32 bytes further per step inside the 128-byte swizzled row.
    const uint32_t offset_q = (kk / 4) * Tr::kQChunkBytes + (kk % 4) * 32;
    const uint32_t offset_k = (kk / 4) * Tr::kKVChunkBytes + (kk % 4) * 32;
    Mma::ss(s, ptx::make_smem_desc(smem_q_wg + offset_q, 16, 1024), ptx::make_smem_desc(smem_k + offset_k, 16, 1024),
            kk > 0);
  }
}

template <typename Tr>
__device__ __forceinline__ void issue_pv(float (&o)[Tr::kHeadDim / 2], const PFragment<Tr>& p, uint32_t smem_v) {
  using Mma = Wgmma<Tr::kHeadDim, typename Tr::Element, 1>;
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
    // 16 keys = two 8-row groups (SBO 1024 apart); 64-column chunks of V lie kKVChunkBytes apart (LBO).
    Mma::rs(o, p[kk], ptx::make_smem_desc(smem_v + kk * 16 * Tr::kRowBytes, Tr::kKVChunkBytes, 1024), true);
  }
}

}  // namespace flashattn::cuda::sm90
