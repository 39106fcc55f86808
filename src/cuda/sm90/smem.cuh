// The shared memory of one sm90 forward CTA, laid out by FwdTraits: Q, the K and V stage rings,
// and the mbarriers that hand stages between the producer and the consumers.
//
//   full_q            the producer's TMA of the tile's Q completed (one phase per tile; a tile
//                     without keys gets a plain arrival and no copy)
//   empty_q           the consumers are done with Q (and, when O shares its rows, with O)
//   full_k/v[s]       stage s holds the next K (V) block: one producer arrival + the TMA bytes
//   empty_k/v[s]      every consumer warp is done reading stage s: the producer may refill it
#pragma once

#include <cstdint>

#include "cuda/sm90/ptx.h"

namespace flashattn::cuda::sm90 {

template <typename Tr>
struct SmemView {
  uint8_t* base;  // 1024-byte aligned

  __device__ explicit SmemView(uint8_t* raw)
      : base(reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023))) {}

  __device__ uint8_t* q() const { return base + Tr::kOffQ; }
  __device__ uint8_t* k(int stage) const { return base + Tr::kOffK + stage * Tr::kKVBytes; }
  __device__ uint8_t* v(int stage) const { return base + Tr::kOffV + stage * Tr::kKVBytes; }
  __device__ uint8_t* o() const { return base + Tr::kOffO; }

  __device__ uint64_t* barriers() const { return reinterpret_cast<uint64_t*>(base + Tr::kOffBarriers); }
  __device__ uint64_t* full_q() const { return barriers(); }
  __device__ uint64_t* empty_q() const { return barriers() + 1; }
  __device__ uint64_t* full_k(int stage) const { return barriers() + 2 + stage; }
  __device__ uint64_t* full_v(int stage) const { return barriers() + 2 + Tr::kStages + stage; }
  __device__ uint64_t* empty_k(int stage) const { return barriers() + 2 + 2 * Tr::kStages + stage; }
  __device__ uint64_t* empty_v(int stage) const { return barriers() + 2 + 3 * Tr::kStages + stage; }

  // One thread, before anyone else touches the barriers (a __syncthreads follows).
  __device__ void init_barriers() const {
    ptx::mbarrier_init(full_q(), 1);
    ptx::mbarrier_init(empty_q(), Tr::kQReleaseArrivals);
    for (int s = 0; s < Tr::kStages; ++s) {
      ptx::mbarrier_init(full_k(s), 1);  // the producer's arrive_expect_tx
      ptx::mbarrier_init(full_v(s), 1);
      ptx::mbarrier_init(empty_k(s), Tr::kConsumerWGs * 4);  // lane 0 of every consumer warp
      ptx::mbarrier_init(empty_v(s), Tr::kConsumerWGs * 4);
    }
    ptx::fence_barrier_init();
  }
};

// Where block `it` (0, 1, ... in the order the CTA visits key blocks, counted across its tiles)
// sits in the ring, and the parity of the barrier phase that announces it.
template <typename Tr>
struct Slot {
  int stage;
  uint32_t phase;
  __device__ static Slot of(int it) { return {it % Tr::kStages, uint32_t((it / Tr::kStages) & 1)}; }
};

}  // namespace flashattn::cuda::sm90
