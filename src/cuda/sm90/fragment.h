// The layout of a wgmma fp32 accumulator fragment, named once. A thread holds two rows of its
// warp's 16 (g and g + 8, lane = 4g + t) and, per n8 tile i of the N columns, the column pair
// 8i + 2t + {0, 1}: the m16n8 C layout repeated along N. acc_at(i, hh, e) is the register of tile i,
// row half hh (row g + 8hh), pair element e.
#pragma once

namespace flashattn::cuda::sm90 {

__host__ __device__ __forceinline__ constexpr int acc_at(int i, int hh, int e = 0) { return 4 * i + 2 * hh + e; }

}  // namespace flashattn::cuda::sm90
