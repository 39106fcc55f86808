// Compile-time shape of one sm90 forward instantiation: tiles (tile_size.h), threads, register
// split, shared-memory layout and the schedule of the consumer warpgroups.
#pragma once

#include <cstdint>

#include "cuda/sm90/tile_size.h"

namespace flashattn::cuda::sm90 {

// How a consumer warpgroup orders its two GEMMs and its softmax (bench/gpu/HOPPER_NOTES.md; the
// serial schedule, GEMMs and softmax one after the other, lost to both and is gone).
enum class Schedule : int {
  kOverlap = 1,   // the next block's Q K^T runs on the tensor cores while this thread does the softmax
  kPingPong = 2,  // kOverlap, and the consumer warpgroups take turns issuing GEMMs (named barriers),
                  // so one's softmax hides under the other's GEMMs
};

constexpr const char* schedule_name(Schedule s) {
  return s == Schedule::kOverlap ? "overlap" : "pingpong";
}

template <int kHeadDim_, typename Element_, Schedule kSchedule_, bool kNarrow_ = false>
struct FwdTraits {
  using Element = Element_;
  static constexpr Schedule kSchedule = kSchedule_;
  static constexpr bool kNarrow = kNarrow_;  // the masked-call tile of tile_size.h
  static constexpr FwdTile kTile = fwd_tile(kHeadDim_, kNarrow_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kConsumerWGs = kTile.consumer_wgs;
  static constexpr int kStages = kTile.stages;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 is the producer
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  // Rescale O only when a row's max rises by more than kRescaleSlack (softmax.cuh): for O of 64+
  // registers per thread.
  static constexpr bool kLazyRescale = kHeadDim >= 128;

  // The producer needs a handful of registers (one thread issues TMA); the consumers share the rest.
  // setmaxnreg counts are multiples of 8 in [24, 256]. Every warp starts with the launch cap
  // (__launch_bounds__(kThreads, 1): 64 K / kThreads, rounded down to 8), and the consumers' increase
  // can only come from what the producer gave back in the same CTA: an increase beyond it waits
  // forever (a hang seen on the H100 with 32 / 240 at 384 threads).
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;
  static constexpr int kProducerRegs = kConsumerWGs == 2 ? 24 : 32;
  static_assert(kConsumerWGs * (kConsumerRegs - kLaunchRegs) <= kLaunchRegs - kProducerRegs,
                "setmaxnreg: the consumers may only take the registers the producer released");

  // Shared memory: each tile is [kHeadDim / 64 chunks][rows][64 elements], 128-byte rows in the
  // 128-byte swizzle TMA writes and wgmma reads. O gets its own buffer where it fits (d <= 128), so
  // the producer loads the next tile's Q while this tile's O is stored; otherwise O reuses each
  // consumer warpgroup's own Q rows and the next Q waits for the store.
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kRowBytes = 128;
  static constexpr int kQBytes = kBlockM * kHeadDim * int(sizeof(Element));
  static constexpr int kKVBytes = kBlockN * kHeadDim * int(sizeof(Element));  // one stage of K (or V)
  static constexpr int kQChunkBytes = kBlockM * kRowBytes;
  static constexpr int kKVChunkBytes = kBlockN * kRowBytes;
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKVBytes;
  static constexpr int kBarriers = 2 + 4 * kStages;  // Q full / empty; K and V full / empty per stage
  // +1 KB: the dynamic shared memory base is rounded up to the 1 KB a swizzle atom needs.
  static constexpr int kFixedBytes = kOffV + kStages * kKVBytes + 8 * kBarriers + 1024;
  static constexpr bool kSeparateO = kFixedBytes + kQBytes <= kMaxSmemBytes;
  static constexpr int kOffO = kSeparateO ? kOffV + kStages * kKVBytes : kOffQ;
  static constexpr int kOffBarriers = kOffV + kStages * kKVBytes + (kSeparateO ? kQBytes : 0);
  static constexpr int kSmemBytes = kOffBarriers + 8 * kBarriers + 1024;
  // Who frees the Q buffer for the next tile: lane 0 of every consumer warp once its last Q K^T is
  // done (separate O), or the storing thread of each consumer warpgroup once the TMA store of O has
  // read the rows it shares with Q.
  static constexpr int kQReleaseArrivals = kSeparateO ? 4 * kConsumerWGs : kConsumerWGs;

  static_assert(sizeof(Element) == 2, "16-bit inputs: wgmma k16, 64 elements per 128-byte row");
  static_assert(kHeadDim % 64 == 0, "whole 64-column chunks (other head dims pad up to one)");
  static_assert(kBlockM == 64 * kConsumerWGs, "each consumer warpgroup owns 64 rows (the wgmma M)");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "O += P V consumes keys in k16 slices; wgmma N <= 256");
  static_assert(kBlockM <= 256 && kBlockN <= 256, "a TMA box has at most 256 rows");
  static_assert(kQChunkBytes % 1024 == 0 && kKVChunkBytes % 1024 == 0, "swizzle atoms stay 1 KB aligned");
  static_assert(kSmemBytes <= kMaxSmemBytes, "must fit the 227 KB of shared memory per block of sm90");
  static_assert(kSchedule != Schedule::kPingPong || kConsumerWGs == 2, "ping-pong pairs two warpgroups");
};

}  // namespace flashattn::cuda::sm90
