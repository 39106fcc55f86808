// Every tile choice of the sm90 forward kernel, in one place. A choice depends only on the
// instantiated (padded) head dim; each line says why.
//
// Budget: a consumer warpgroup owns 64 query rows (the M of one wgmma), so per thread the O
// accumulator holds head_dim / 2 fp32 registers, S holds block_n / 2, and P (S rounded to 16 bits,
// the register A operand of O += P V) block_n / 4. With the next block's S in flight while P V runs,
// S, P and O live together. setmaxnreg gives each consumer thread kConsumerRegs of the 64 K
// registers (the producer keeps kProducerRegs). Shared memory: Q plus `stages` x (K + V), 128-byte
// swizzled, <= 227 KB per block, plus an O buffer where one fits (d <= 128; otherwise O reuses each
// warpgroup's own Q rows, fwd_traits.h).
#pragma once

namespace flashattn::cuda::sm90 {

struct FwdTile {
  int block_m;        // query rows per CTA = 64 x consumer warpgroups
  int block_n;        // keys per pipeline stage (the N of S = Q K^T)
  int consumer_wgs;   // consumer warpgroups (each 64 rows); one producer warpgroup besides
  int stages;         // depth of the K/V shared-memory ring

  constexpr bool operator==(const FwdTile&) const = default;
};

constexpr int kMaxSmemBytes = 227 * 1024;

// `narrow`: the tile for masked calls with few query blocks per head (dispatch.cpp decides). Only
// d64 has one that differs: 128 rows (2 consumer warpgroups) instead of 192, because a causal
// diagonal through a 192-row block cuts two of its key blocks and leaves more of the computed
// triangle masked (seqlen 1k: 80% of the computed scores are visible with 192x128, 89% with
// 128x128; 512: 70% vs 80%), and with few key blocks per tile that waste is not amortised.
constexpr FwdTile fwd_tile(int head_dim, bool narrow = false) {
  if (head_dim <= 64 && narrow) return {128, 128, 2, 2};
  // O is 32 registers: room for 3 consumer warpgroups (160 registers each) and 192 rows, which
  // halves the K/V reloads per query row against 128 rows; 128 keys amortise the softmax.
  // Smem: 24 KB Q + 2 x 32 KB K/V + 24 KB O.
  if (head_dim <= 64) return {192, 128, 3, 2};
  // O 64 + S 64 + P 32 registers of 240; Q 32 KB + 2 x 64 KB K/V + 32 KB O = 192 KB. (128x176,
  // FA3's non-causal choice, measured 5-15% slower here: bench/gpu/HOPPER_NOTES.md.)
  if (head_dim <= 128) return {128, 128, 2, 2};
  // O 96 + S 56 + P 28; Q 48 KB + 2 x (2 x 42 KB) = 216 KB (128 keys would need 240 KB); O in Q.
  if (head_dim <= 192) return {128, 112, 2, 2};
  // O 128 + S 40 + P 20; Q 64 KB + 2 x (2 x 40 KB) = 224 KB, the most two stages allow; O in Q.
  return {128, 80, 2, 2};
}

}  // namespace flashattn::cuda::sm90
