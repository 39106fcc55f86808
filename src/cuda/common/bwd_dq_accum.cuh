// How a CTA of the backward adds its share of dQ (one query block, one head) into the fp32
// workspace, where every key block that the query block sees adds a term.
//
// Default: fire-and-forget fp32 reductions performed at L2 (red.global.add), in whatever order the
// CTAs get there. Fastest, but fp32 addition is not associative: the last bits of dQ vary from run
// to run.
//
// Deterministic (params.deterministic): the key blocks that see a query block add to it one at a
// time, in decreasing key-block order, ordered by one counter per (sequence, head, query block):
// the CTA of key block n waits until the counter equals its rank among those key blocks, adds, and
// increments it. Each dQ element is then the same fp32 sum in the same order on every run.
// Chosen over per-key-block partial buffers summed afterwards because it costs no memory (partials
// would be n_blocks times the dQ workspace: 64 x 128 MiB at 16k tokens, 8k keys) and no extra pass.
// Its price is waiting: the CTAs of one (sequence, kv head) walk the query blocks in the same
// order, each a step behind the one before it. Decreasing order keeps that step short under a
// causal mask: a CTA's first query block is one that no higher key block sees, so it adds at once,
// and every later one waits for a CTA that reached it earlier. (Increasing order would make key
// block n wait at its first query block until key block 0 had walked all the way there.)
// It cannot deadlock: a CTA only waits for CTAs of higher key blocks of the same (sequence, kv
// head); the key block is the fastest-varying grid index, laid out in decreasing order in this
// mode, so they have smaller blockIdx.x, and the GPU starts CTAs in blockIdx order: they already
// run or have finished, and they in turn only wait for ones started earlier still. (FA3 and
// CUTLASS's semaphores rely on the same launch order.)
#pragma once

#include <cstdint>

namespace flashattn::cuda {

template <bool kDeterministic>
struct DqAccumulator {
  int* counter = nullptr;  // deterministic only

  // Before the adds: wait for this CTA's turn (`rank` earlier key blocks have added). Every thread
  // of the CTA calls it.
  __device__ __forceinline__ void begin(int* counter_, int rank) {
    if constexpr (kDeterministic) {
      counter = counter_;
      if (threadIdx.x == 0) {
        int seen;
        do {
          asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
        } while (seen != rank);
      }
      __syncthreads();
    }
  }

  // dQ[addr], dQ[addr + 1] += (a, b)
  __device__ __forceinline__ void add2(float* addr, float a, float b) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(addr, a);  // result unused: compiles to a RED
    atomicAdd(addr + 1, b);
#endif
  }

  // After the adds: hand the turn to the next key block. Each thread's fence orders its reductions
  // before the barrier, and so before thread 0's increment.
  __device__ __forceinline__ void end() const {
    if constexpr (kDeterministic) {
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(counter, 1);
    }
  }
};

}  // namespace flashattn::cuda
