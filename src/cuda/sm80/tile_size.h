// Every tile choice of the sm80 forward kernel, in one place. A choice depends only on the
// instantiated (padded) head dim; each line says why.
//
// Budget per thread: the O accumulator holds (rows per warp) * head_dim / 32 fp32 registers and
// S holds (rows per warp) * kBlockN / 32; a thread has at most 255. Shared memory: Q plus two
// stages of K and V, rows padded by 16 bytes, must fit A100's 163 KB so one binary serves
// sm80 and sm90, except where a larger tile pays off on sm90 (227 KB per block).
#pragma once

namespace flashattn::cuda::sm80 {

struct FwdTile {
  int block_m;  // query rows per CTA
  int block_n;  // keys per pipeline stage
  int warps;    // each warp owns block_m / warps consecutive query rows

  constexpr bool operator==(const FwdTile&) const = default;
};

// large_smem: the device lets one block opt in to kLargeSmemBytes (sm90), not only A100's 163 KB.
constexpr int kSmallSmemBytes = 163 * 1024;
constexpr int kLargeSmemBytes = 227 * 1024;

constexpr FwdTile fwd_tile(int head_dim, bool large_smem) {
  // 32 rows per warp: each K/V fragment read from smem feeds two MMAs (smem bandwidth, not
  // the tensor cores, bounds mma.sync on sm90); 128 keys amortise the per-block softmax.
  if (head_dim <= 64) return {128, 128, 4};
  // O takes 96 registers; S over 64 keys another 64.
  if (head_dim <= 96) return {128, 64, 4};
  // O takes 128 registers: 64 keys keep S at 64 and the total under 255 (FA2's H100 choice).
  if (head_dim <= 128) return {128, 64, 4};
  // O would need 192+ registers at 32 rows per warp: 8 warps of 16 rows.
  if (head_dim <= 192) return {128, 64, 8};
  // d = 256: 8 warps of 16 rows (O = 128 regs). 64 keys per stage need 203 KB: 15% faster on
  // H100 than 32 keys, which keep Q + 2x(K+V) at 135 KB for A100.
  return large_smem ? FwdTile{128, 64, 8} : FwdTile{128, 32, 8};
}

// The decode kernel (sm80/decode_kernel.cuh): few packed query rows, long keys, memory-bound.
// One m16 tile of packed rows per CTA; each warp streams its own 16-key blocks through a private
// cp.async ring, so the K/V bytes in flight per SM are warps x (stages - 1) x 16 keys x 2 rows.
struct DecodeTile {
  int warps;   // warps per CTA, each taking every warps-th key block of the CTA's keys
  int stages;  // depth of each warp's K/V ring (stages - 1 blocks in flight while one is used)

  constexpr bool operator==(const DecodeTile&) const = default;
};

constexpr DecodeTile decode_tile(int head_dim) {
  // 4 warps x 4 stages x 16 keys (K and V, padded rows) = 74 KB at d = 64: 2-3 CTAs per SM.
  if (head_dim <= 64) return {4, 4};
  // 3 stages: 83 KB (d = 96) / 106 KB (d = 128) of smem, so two CTAs share an H100 SM (228 KB):
  // 2 x 4 warps x 2 blocks x 8.5 KB = 139 KB in flight per SM, far above what HBM latency needs.
  if (head_dim <= 128) return {4, 3};
  // d = 192 / 256: each stage is 12.5 / 16.5 KB per warp; 2 stages keep a CTA in A100's 163 KB.
  return {4, 2};
}

}  // namespace flashattn::cuda::sm80
