// Compile-time shape of one sm90 backward instantiation: the tile, threads, register split and
// the shared-memory layout (bwd_kernel.cuh).
//
// One CTA owns kBlockN = 128 keys of one (kv head, sequence); each of its two consumer warpgroups
// owns 64 of them, the M of the transposed products it computes per query block of kBlockM rows:
//   S^T  = K Q^T,  dP^T = V dO^T          64 keys x kBlockM queries, A and B from smem
//   dV  += P^T dO, dK  += dS^T Q          64 keys x head dim, A (P^T, dS^T) from registers
//   dQ   = dS K                           a 64 x 64 share of the kBlockM x head-dim block, from smem
// Register budget of a consumer thread (240 after setmaxnreg): dK + dV hold head_dim fp32, S^T and
// dP^T kBlockM / 2 each, P^T and dS^T as 16-bit A fragments kBlockM / 4 each, dQ 32.
//   d 64:  kBlockM = 128: 64 + 128 + 64 + 32 = 288 live at most if all overlapped; S^T and dP^T die
//          into the fragments, so the peak is dK + dV + S^T + dP^T = 192.
//   d 128: kBlockM = 64:  128 + 64 + 32 + 32 = 256 at most; peak dK + dV + S^T + dP^T = 192.
// kBlockM * head_dim = 2 x 64 x 64 in both: the dQ block splits into one 64 x 64 share per
// warpgroup (rows for d 64, columns for d 128).
#pragma once

#include <cstdint>

#include "cuda/sm90/tile_size.h"  // kMaxSmemBytes

namespace flashattn::cuda::sm90 {

constexpr int bwd_block_m(int head_dim) { return head_dim <= 64 ? 128 : 64; }

template <int kHeadDim_, typename Element_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = bwd_block_m(kHeadDim_);  // query rows per step
  static constexpr int kBlockN = 128;                     // keys per CTA, 64 per consumer warpgroup
  static constexpr int kStages = 2;                       // Q / dO / LSE / D buffers
  static constexpr int kConsumerWGs = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 is the producer
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  // setmaxnreg: see FwdTraits (the consumers only take what the producer released).
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kProducerRegs = 24;

  // The dQ share of consumer warpgroup wg: rows [dq_row0, +64) x columns [dq_col0, +64).
  static constexpr bool kDqSplitsRows = kBlockM == 128;

  // Shared memory: tiles are [64-column chunks][rows][64 elements], 128-byte rows in the 128-byte
  // swizzle (TMA writes it, wgmma reads it). dS^T is stored with the keys as rows and the queries
  // as columns (the layout the accumulators give), read as an MN-major A for dQ = dS K; two
  // buffers, so a warpgroup writing step j + 1's half never meets the other one still reading
  // step j's.
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kRowBytes = 128;
  static constexpr int kQChunkBytes = kBlockM * kRowBytes;  // Q, dO
  static constexpr int kKChunkBytes = kBlockN * kRowBytes;  // K, V
  static constexpr int kDsChunkBytes = kBlockN * kRowBytes;
  static constexpr int kQBytes = kChunks * kQChunkBytes;
  static constexpr int kKBytes = kChunks * kKChunkBytes;
  static constexpr int kDsBytes = (kBlockM / 64) * kDsChunkBytes;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffQ = kOffV + kKBytes;             // kStages buffers
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;  // kStages buffers
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;  // 2 buffers
  static constexpr int kOffLse = kOffDs + 2 * kDsBytes;     // kStages x kBlockM fp32
  static constexpr int kOffDelta = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffBarriers = kOffDelta + kStages * kBlockM * 4;
  static constexpr int kBarriers = 1 + 2 * kStages;  // K/V full; per stage full / empty
  static constexpr int kSmemBytes = kOffBarriers + 8 * kBarriers + 1024;  // + the 1 KB alignment

  static_assert(sizeof(Element) == 2, "16-bit inputs: wgmma k16, 64 elements per 128-byte row");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the tiles above are sized for head dims 64 and 128");
  static_assert(kBlockM * kHeadDim == 2 * 64 * 64, "the dQ block splits into two 64 x 64 shares");
  static_assert(kBlockN == 64 * kConsumerWGs, "each consumer warpgroup owns 64 keys (the wgmma M)");
  static_assert(kQChunkBytes % 1024 == 0 && kKChunkBytes % 1024 == 0, "swizzle atoms stay 1 KB aligned");
  static_assert(kSmemBytes <= kMaxSmemBytes, "must fit the 227 KB of shared memory per block of sm90");
  static_assert(kConsumerWGs * (kConsumerRegs - kLaunchRegs) <= kLaunchRegs - kProducerRegs,
                "setmaxnreg: the consumers may only take the registers the producer released");
};

}  // namespace flashattn::cuda::sm90
