// Which tiles (query block, head, sequence) a persistent CTA works on. The grid has one CTA per SM
// (or fewer) and walks the tiles in rounds of `grid`: in round j, CTA i takes work item
// j * grid + i when j is even and j * grid + (last - i) when j is odd (zig-zag), so a CTA's next
// tile starts loading while its current one computes and stores.
//
// Work item order: the query block varies fastest, so the CTAs of one round share a few heads and
// their K/V stay in L2; within a head the query blocks with the most visible keys (the last ones
// under a causal mask) come first. Under a causal mask the items of a round differ in cost; the
// zig-zag gives the CTA that took a heavy item in one round a light one in the next, so the CTAs
// stay in step (plain round robin let them drift apart across heads: L2 misses, and when the SM
// count is a multiple of the query blocks per head, one CTA got the heaviest block every round).
#pragma once

#include <cstdint>

#include "cuda/sm90/fwd_params.h"

namespace flashattn::cuda::sm90 {

// The work of one tile: query block, head, sequence, and the key blocks [n_begin, n_end) it visits.
struct BlockCoord {
  int m_block, h, b, hk;
  int n_begin, n_end;
  int m0;    // first query row of the block
  int rows;  // valid query rows of the block (<= kBlockM)

  __device__ bool has_keys() const { return n_end > n_begin; }
};

// The work item of the CTA's tile slot `tile` (blockIdx.x, + gridDim.x, ...): a permutation of
// [0, tiles) that reverses every odd round.
__device__ __forceinline__ int zigzag(int tile, int tiles) {
  const int grid = int(gridDim.x);
  const int round = tile / grid, lane = tile % grid;
  const int first = round * grid;
  const int in_round = min(grid, tiles - first);
  return first + ((round & 1) ? in_round - 1 - lane : lane);
}

template <typename Tr>
__device__ __forceinline__ BlockCoord tile_coord(const FwdParams& p, int tile) {
  tile = zigzag(tile, p.tiles);
  BlockCoord c;
  c.m_block = p.m_blocks - 1 - tile % p.m_blocks;
  tile /= p.m_blocks;
  c.h = tile % p.heads;
  c.b = tile / p.heads;
  c.hk = c.h / p.group;
  c.m0 = c.m_block * Tr::kBlockM;
  c.rows = min(Tr::kBlockM, p.mask.seqlen_q - c.m0);
  // Keys any row of the block sees (both bounds are monotone in the row).
  const int key_lo = p.mask.key_begin(c.m0);
  const int key_hi = p.mask.key_end(c.m0 + c.rows - 1);
  c.n_begin = key_lo / Tr::kBlockN;
  c.n_end = key_hi > key_lo ? (key_hi + Tr::kBlockN - 1) / Tr::kBlockN : c.n_begin;
  return c;
}

}  // namespace flashattn::cuda::sm90
