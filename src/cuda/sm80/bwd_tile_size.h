// Every tile choice of the sm80 backward kernel, in one place. A choice depends only on the
// instantiated (padded) head dim and on whether the GPU grants the large shared memory; each line
// says why.
//
// One CTA owns a key block of block_n keys (its dK/dV accumulate in registers) and walks the query
// blocks of block_m rows that see it. Per query block it runs five products, each with its own
// warp grid over the 8 warps:
//   S = Q K^T, dP = dO V^T   (block_m x block_n)  warps: sdp_warps_m x (warps / sdp_warps_m)
//   dV += P^T dO, dK += dS^T Q (block_n x d)      warps: dkv_warps_n x (warps / dkv_warps_n)
//   dQ = dS K                 (block_m x d)       warps: dq_warps_m x (warps / dq_warps_m)
// Register budget per thread (<= 255): dK + dV hold 2 * block_n * d / 256 fp32, S + dP another
// 2 * block_m * block_n / 256 while they live. Shared memory: K, V (block_n rows), `stages` buffers
// of Q and dO (block_m rows), P and dS (block_m x block_n), rows padded by 16 bytes.
#pragma once

namespace flashattn::cuda::sm80 {

struct BwdTile {
  int block_m;      // query rows per step of the query loop
  int block_n;      // keys per CTA
  int warps;
  int sdp_warps_m;  // warps along the queries of S / dP
  int dkv_warps_n;  // warps along the keys of dK / dV
  int dq_warps_m;   // warps along the queries of dQ
  int stages;       // Q/dO buffers: 2 lets the next query block's loads overlap this block's math
  int min_blocks = 1;  // CTAs per SM the kernel is compiled for (__launch_bounds__)

  constexpr bool operator==(const BwdTile&) const = default;
};

constexpr int kBwdSmallSmemBytes = 163 * 1024;  // A100: one binary serves sm80 and sm90
constexpr int kBwdLargeSmemBytes = 227 * 1024;  // H100

constexpr BwdTile bwd_tile(int head_dim, bool large_smem) {
  // 128 keys per CTA halve the Q/dO re-reads of 64-key blocks; dK+dV = 64 registers. 128 query
  // rows (S+dP = 128 registers, 182 KB of smem) were 14% faster on H100 than 64 (230 vs 204 TFLOP/s
  // at 8k): half the barriers and P/dS round trips per query row. A100 keeps 64 rows (107 KB).
  // Measured and dropped: 64x64 tiles of 4 warps, 2 or 3 CTAs per SM (+1-3%), 128x64 (-6%).
  if (head_dim <= 64) return large_smem ? BwdTile{128, 128, 8, 2, 4, 4, 2} : BwdTile{64, 128, 8, 2, 4, 2, 2};
  // dK+dV = 96 registers; a 48-column dK/dV/dQ warp tile keeps whole 16-column ldmatrix loads.
  if (head_dim <= 96) return {64, 128, 8, 2, 4, 4, 2};
  // dK+dV = 128 and S+dP = 64 registers (FA2's H100 choice). 171 KB with two Q/dO stages: A100's
  // 163 KB takes one stage (-8% on H100). Measured and dropped: 64x64 tiles of 4 warps, 2 CTAs
  // per SM (-22%), 128x64 (-23%).
  if (head_dim <= 128) return large_smem ? BwdTile{64, 128, 8, 2, 4, 2, 2} : BwdTile{64, 128, 8, 2, 4, 2, 1};
  // 128 keys would need 192+ registers of dK+dV: 64 keys, 32 keys x 48 columns per warp (96).
  if (head_dim <= 192) return large_smem ? BwdTile{64, 64, 8, 2, 2, 2, 2} : BwdTile{64, 64, 8, 2, 2, 2, 1};
  // d = 256: 64 keys, dK+dV = 128 registers; two stages take 217 KB (sm90 only).
  return large_smem ? BwdTile{64, 64, 8, 2, 2, 2, 2} : BwdTile{64, 64, 8, 2, 2, 2, 1};
}

}  // namespace flashattn::cuda::sm80
