// The epilogue of a consumer warpgroup: O / l rounded to the input dtype into its 64 rows of the O
// buffer, in the 128-byte swizzle of the O tensor map, then one TMA store per 64-column chunk (rows
// past the sequence and columns past head_dim_v are clipped by the tensor map). LSE =
// ln2 * (m + log2 l) in fp32, or -inf (with O = 0) for a row that saw no key.
//
// The O buffer is either its own (Tr::kSeparateO: the store runs on while the next tile computes;
// the next epilogue first waits until it has read the buffer) or the warpgroup's own Q rows (no
// other warpgroup reads them and its last Q K^T has completed; the producer may load the next Q
// only after the store has read them, so the storing thread waits and then frees Q).
#pragma once

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/sm90/fragment.h"
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/smem.cuh"
#include "cuda/sm90/softmax.cuh"

namespace flashattn::cuda::sm90 {

// Named barrier ids (0 is __syncthreads): 1, 2 ping-pong turns; 3.. one per consumer warpgroup.
constexpr int kBarrierPingPong0 = 1;
constexpr int kBarrierEpilogue0 = 3;

template <typename Tr>
__device__ __forceinline__ void store_o(const FwdParams& p, const SmemView<Tr>& smem, float (&o)[Tr::kHeadDim / 2],
                                        const OnlineSoftmax<Tr::kBlockN, Tr::kLazyRescale>& softmax, int m0, int h,
                                        int b, int wg, int thread_in_wg) {
  using T = typename Tr::Element;
  const int warp = thread_in_wg / 32, lane = thread_in_wg % 32;
  const int g = lane / 4, t = lane % 4;

  float inv[2], lse[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float l = quad_sum(softmax.row_sum[hh]);
    inv[hh] = l > 0.0f ? 1.0f / l : 0.0f;
    lse[hh] = l > 0.0f ? (softmax.row_max[hh] + log2f(l)) * kLn2 : neg_inf();
  }

  uint8_t* smem_o = smem.o() + wg * 64 * Tr::kRowBytes;
  if constexpr (Tr::kSeparateO) {
    // The previous tile's store must have read the buffer before it is overwritten.
    if (thread_in_wg == 0) ptx::tma_store_wait_read();
    ptx::named_barrier_sync(kBarrierEpilogue0 + wg, 128);
  }
  // Row r (of the warpgroup's 64) keeps 16-byte chunk c of a 128-byte row at position c ^ (r % 8);
  // this thread's rows are g and g + 8, so r % 8 = g for both. 32-bit shared addresses keep the
  // per-thread address arithmetic small (it stays live across the persistent tile loop otherwise).
  const uint32_t row_addr = ptx::smem_addr(smem_o) + (warp * 16 + g) * Tr::kRowBytes + t * 4;
#pragma unroll
  for (int i = 0; i < Tr::kHeadDim / 8; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint32_t addr = row_addr + (i / 8) * Tr::kQChunkBytes + hh * 8 * Tr::kRowBytes + (((i % 8) ^ g) * 16);
      ptx::st_shared_u32(addr, ptx::pack2<T>(o[acc_at(i, hh)] * inv[hh],
                                                              o[acc_at(i, hh, 1)] * inv[hh]));
    }
  ptx::fence_proxy_async_smem();  // our st.shared -> the TMA engine's reads
  ptx::named_barrier_sync(kBarrierEpilogue0 + wg, 128);
  const int row0 = m0 + wg * 64;
  if (thread_in_wg == 0 && row0 < p.mask.seqlen_q) {
#pragma unroll
    for (int ch = 0; ch < Tr::kChunks; ++ch)
      ptx::tma_store_4d(&p.tma_o, ch * 64, row0, h, b, smem_o + ch * Tr::kQChunkBytes);
  }
  if (thread_in_wg == 0) ptx::tma_store_commit();  // possibly an empty group: waits count groups

  if (t == 0 && p.lse) {  // null: the caller wants no LSE
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + warp * 16 + g + 8 * hh;
      if (row < p.mask.seqlen_q) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row] = lse[hh];
    }
  }
  if constexpr (!Tr::kSeparateO) {
    // O shares its rows with Q: free them once the store has read them.
    if (thread_in_wg == 0) {
      ptx::tma_store_wait_read();
      ptx::mbarrier_arrive(smem.empty_q());
    }
  }
}

}  // namespace flashattn::cuda::sm90
