// The Hopper part of our PTX layer (namespace flashattn::cuda::ptx, with cuda/common/ptx.h's
// sm80 instructions): what CCCL's cuda::ptx does not wrap (wgmma fences and
// descriptors, setmaxnreg, named barriers) plus thin, named wrappers over cuda::ptx for the
// mbarrier and bulk-tensor (TMA) instructions the sm90 kernel uses. Each wrapper is one
// instruction (or a wait loop around one). Device code only: compiled for sm_90a.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: no libcuda link)
#include <cuda/ptx>

#include <cstdint>

#include "cuda/common/ptx.h"  // smem_addr and the sm80 instructions

namespace flashattn::cuda::ptx {

// A 4-byte store to a shared-memory (32-bit) address.
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// ---- wgmma ------------------------------------------------------------------------------------
// Orders this thread's register writes before the next wgmma that reads them (accumulators, A).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins a register at this point of the program for the compiler: reads of a wgmma result are not
// hoisted above the wait that completes it, and writes of an operand are not sunk below the issue.
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <typename T, int N>
__device__ __forceinline__ void fence_operands(T (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_operand(x[i]);
}
template <typename T, int M, int N>
__device__ __forceinline__ void fence_operands(T (&x)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i) fence_operands(x[i]);
}

// Shared-memory matrix descriptor of a 128-byte-swizzled operand (PTX ISA "Matrix Descriptor"):
// start address, leading and stride byte offsets (all >> 4), layout type 1 = 128B swizzle in bits
// 62-63. Our tiles are [chunks of 64 elements][rows][64 elements], each row 128 bytes, 8-row
// swizzle atoms of 1024 bytes aligned to 1024 (base offset 0):
//  K-major (Q, K: the reduction dim is contiguous): SBO = 1024 (next 8 rows), LBO unused (1).
//    A k16 step inside a 64-wide chunk moves the start address by 32 bytes.
//  MN-major (V: the N dim is contiguous): LBO = the byte distance between 64-column chunks,
//    SBO = 1024 (next 8 rows of K). A k16 step moves the start address by 16 rows = 2048 bytes.
__device__ __forceinline__ uint64_t make_smem_desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(lbo_bytes >> 4) << 16) |
         (uint64_t(sbo_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

// ---- register reallocation and named barriers ---------------------------------------------
// Every warp of a warpgroup executes the same one; needs a register cap at kernel entry
// (__launch_bounds__(threads, 1)).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Barrier `id` (1..15; 0 is __syncthreads) completes when `threads` threads arrived; sync waits
// for it, arrive does not.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- mbarriers (cuda::ptx) --------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  ::cuda::ptx::mbarrier_init(bar, arrivals);
}
// Makes the initialised barriers visible to the async proxy (TMA) before anyone uses them.
__device__ __forceinline__ void fence_barrier_init() {
  ::cuda::ptx::fence_mbarrier_init(::cuda::ptx::sem_release, ::cuda::ptx::scope_cluster);
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) { (void)::cuda::ptx::mbarrier_arrive(bar); }
// One arrival that also announces `bytes` of transactions (TMA) the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  (void)::cuda::ptx::mbarrier_arrive_expect_tx(::cuda::ptx::sem_release, ::cuda::ptx::scope_cta,
                                               ::cuda::ptx::space_shared, bar, bytes);
}
// Blocks until the phase with this parity has completed. A fresh barrier counts as having
// completed the phase of parity 1, so a producer's first wait on an empty slot passes at once.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!::cuda::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
}

// ---- bulk tensor copies (TMA, cuda::ptx) ----------------------------------------------------
// Box at coordinates (c0 innermost .. c3) of a 4-D tensor map -> shared memory, completing
// `bytes` on `bar`. Out-of-bounds elements arrive as zeros.
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  const int32_t coords[4] = {c0, c1, c2, c3};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_cluster, ::cuda::ptx::space_global, smem_dst, map, coords,
                                    bar);
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory,
// completing on `bar` like a tensor copy.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  ::cuda::ptx::cp_async_bulk(::cuda::ptx::space_cluster, ::cuda::ptx::space_global, smem_dst, gmem_src, bytes, bar);
}
// Shared memory -> the box at (c0 .. c3); elements outside the tensor are not written.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                             const void* smem_src) {
  const int32_t coords[4] = {c0, c1, c2, c3};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_global, ::cuda::ptx::space_shared, map, coords, smem_src);
}
__device__ __forceinline__ void tma_store_commit() { ::cuda::ptx::cp_async_bulk_commit_group(); }
// Waits until the committed stores have read their shared memory (it may be reused or freed).
__device__ __forceinline__ void tma_store_wait_read() {
  ::cuda::ptx::cp_async_bulk_wait_group_read(::cuda::ptx::n32_t<0>{});
}
// Waits until the committed stores are complete (their global writes done).
__device__ __forceinline__ void tma_store_wait_all() { ::cuda::ptx::cp_async_bulk_wait_group(::cuda::ptx::n32_t<0>{}); }
// Ordinary shared-memory writes of this thread become visible to the async proxy (TMA store).
__device__ __forceinline__ void fence_proxy_async_smem() {
  ::cuda::ptx::fence_proxy_async(::cuda::ptx::space_shared);
}

// Hints the tensor map's cache line in ahead of the first copy.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

}  // namespace flashattn::cuda::ptx
