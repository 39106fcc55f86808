// FlashAttention forward for sm90a (Hopper): warp-specialised, TMA + wgmma.
//
// A persistent grid (at most one CTA per SM) walks the tiles (query block, head, sequence) of a
// fixed-length batch (tile_scheduler.cuh); kBlockM = 64 rows per consumer warpgroup. Warpgroup 0 is
// the producer (producer.cuh): one thread TMA-loads each tile's Q and streams K and V blocks, last
// visible block first, through a kStages-deep shared-memory ring that hands stages over on mbarriers
// (smem.cuh), running ahead into the next tile. It gives most of its registers away (setmaxnreg).
// Each consumer warpgroup owns 64 query rows and, per key block:
//   S = Q K^T          wgmma, A and B from shared memory, fp32 accumulators in registers
//   mask               only blocks that cut some row's visible range (causal diagonal, edges)
//   online softmax     exp2 with the scale folded in; O *= alpha
//   O += P V           wgmma with P from registers (the S accumulators rounded to 16 bits)
// then O / l -> shared memory -> TMA store, and LSE (epilogue.cuh).
//
// Schedules (fwd_traits.h): kOverlap issues block j+1's Q K^T
// and block j's P V back to back and computes block j+1's softmax while P V runs. kPingPong adds
// turns between the two consumer warpgroups: each issues its GEMMs only after the other did, so
// the tensor cores alternate between them and each softmax hides under the other's GEMMs.
//
// kScoreMod (softcap and/or ALiBi present): each score becomes ScoreMod::apply(scale * S) before
// the mask, and the softmax scales by log2 e alone; the plain kernel carries none of that code.
//
// Semantics are core/mask.h's (bottom-right causal / window: Mask32 in FwdParams); an
// empty row gives O = 0 and LSE = -inf.
#pragma once

#include <cstdint>

#include "cuda/sm90/epilogue.cuh"
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/fwd_traits.h"
#include "cuda/sm90/gemms.cuh"
#include "cuda/sm90/producer.cuh"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/smem.cuh"
#include "cuda/sm90/softmax.cuh"
#include "cuda/sm90/tile_scheduler.cuh"

namespace flashattn::cuda::sm90 {

template <typename Tr, bool kScoreMod>
struct Consumer {
  static constexpr bool kPingPong = Tr::kSchedule == Schedule::kPingPong;

  const FwdParams& p;
  const SmemView<Tr>& smem;
  int wg;            // 0 .. kConsumerWGs - 1
  int thread_in_wg;  // 0 .. 127
  BlockCoord c;      // the current tile
  int row0;          // sequence row of this thread's first row (the second is row0 + 8)
  int it = 0;        // key blocks consumed so far, across tiles (ring position)

  float o[Tr::kHeadDim / 2];
  float s[Tr::kBlockN / 2];
  PFragment<Tr> pfrag;
  OnlineSoftmax<Tr::kBlockN, Tr::kLazyRescale> softmax;
  ScoreMod mod;  // the current tile's (kScoreMod)

  __device__ uint32_t smem_q_wg() const { return ptx::smem_addr(smem.q() + wg * 64 * Tr::kRowBytes); }

  // Lane 0 of each warp tells the producer this warp is done with a stage.
  __device__ void release(uint64_t* empty) const {
    if (thread_in_wg % 32 == 0) ptx::mbarrier_arrive(empty);
  }

  // Ping-pong turns: wait for ours before issuing GEMMs, hand the turn over after.
  __device__ void take_turn() const {
    if constexpr (kPingPong) ptx::named_barrier_sync(kBarrierPingPong0 + wg, 2 * 128);
  }
  __device__ void pass_turn() const {
    if constexpr (kPingPong) ptx::named_barrier_arrive(kBarrierPingPong0 + (wg ^ 1), 2 * 128);
  }

  // Softmax of the scores of key block n (already in s), leaving P in s.
  __device__ __forceinline__ void scores_to_probs(int n, float (&alpha)[2]) {
    const int key0 = n * Tr::kBlockN;
    if constexpr (kScoreMod) modify_scores<Tr::kBlockN>(s, p, mod, row0, key0, thread_in_wg % 4);
    if (!p.mask.block_fully_visible(c.m0, c.m0 + c.rows, key0, key0 + Tr::kBlockN))
      mask_scores<Tr::kBlockN>(s, p, row0, key0, thread_in_wg % 4);
    softmax.step(s, kScoreMod ? kLog2e : p.scale_log2, alpha);
  }

  // Ring block `ring` (a value of `it`): wait until its K (V) landed; issue the GEMM that reads it.
  __device__ void wait_k(int ring) const {
    const Slot<Tr> slot = Slot<Tr>::of(ring);
    ptx::mbarrier_wait(smem.full_k(slot.stage), slot.phase);
  }
  __device__ void wait_v(int ring) const {
    const Slot<Tr> slot = Slot<Tr>::of(ring);
    ptx::mbarrier_wait(smem.full_v(slot.stage), slot.phase);
  }
  __device__ __forceinline__ void qk(int ring) {
    issue_qk<Tr>(s, smem_q_wg(), ptx::smem_addr(smem.k(Slot<Tr>::of(ring).stage)));
  }
  __device__ __forceinline__ void pv(int ring) {
    issue_pv<Tr>(o, pfrag, ptx::smem_addr(smem.v(Slot<Tr>::of(ring).stage)));
  }

  __device__ void run() {
    if constexpr (kPingPong) {
      // The first turn is warpgroup 0's: warpgroup 1 hands it over before it starts waiting.
      if (wg == 1) ptx::named_barrier_arrive(kBarrierPingPong0 + 0, 2 * 128);
    }
    uint32_t q_phase = 0;
    for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x, q_phase ^= 1) {
      c = tile_coord<Tr>(p, tile);
      row0 = c.m0 + wg * 64 + (thread_in_wg / 32) * 16 + (thread_in_wg % 32) / 4;
      if constexpr (kScoreMod) mod = p.score_mod(c.b, c.h);
#pragma unroll
      for (int i = 0; i < Tr::kHeadDim / 2; ++i) o[i] = 0.0f;
      softmax.init();
      ptx::mbarrier_wait(smem.full_q(), q_phase);
      if (c.has_keys()) mainloop_overlapped();
      // With its own O buffer, Q is free as soon as the last Q K^T is done: the next tile's Q
      // loads while this one's O is written out.
      if constexpr (Tr::kSeparateO) release(smem.empty_q());
      store_o<Tr>(p, smem, o, softmax, c.m0, c.h, c.b, wg, thread_in_wg);
    }
    if constexpr (kPingPong) {
      // Warpgroup 1 handed over one turn more than warpgroup 0 took: take it, so the barrier ends
      // the CTA balanced.
      if (wg == 0) ptx::named_barrier_sync(kBarrierPingPong0 + 0, 2 * 128);
    }
    // The last O stores must be complete before the CTA's shared memory goes away.
    if (thread_in_wg == 0) ptx::tma_store_wait_all();
  }

  __device__ __forceinline__ void mainloop_overlapped() {
    // The last visible block first: S, softmax, P; O is still zero (no rescale).
    int n = c.n_end - 1;
    {
      wait_k(it);
      take_turn();
      ptx::wgmma_fence();
      qk(it);
      ptx::wgmma_commit();
      pass_turn();
      ptx::wgmma_wait<0>();
      ptx::fence_operands(s);
      release(smem.empty_k(Slot<Tr>::of(it).stage));
      float alpha[2];
      scores_to_probs(n, alpha);
      convert_p<Tr>(pfrag, s);
    }
    // Steady state: S of block n - 1 and O += P V of block n in flight together; the softmax of
    // n - 1 runs while P V does.
    for (; n > c.n_begin; --n, ++it) {
      wait_k(it + 1);
      wait_v(it);
      ptx::fence_operands(o);
      ptx::fence_operands(pfrag);
      take_turn();
      ptx::wgmma_fence();
      qk(it + 1);
      ptx::wgmma_commit();
      pv(it);
      ptx::wgmma_commit();
      pass_turn();

      ptx::wgmma_wait<1>();  // Q K^T done (groups complete in order)
      ptx::fence_operands(s);
      release(smem.empty_k(Slot<Tr>::of(it + 1).stage));
      float alpha[2];
      scores_to_probs(n - 1, alpha);

      ptx::wgmma_wait<0>();  // P V done: O and P are ours again
      ptx::fence_operands(o);
      ptx::fence_operands(pfrag);
      release(smem.empty_v(Slot<Tr>::of(it).stage));
      rescale_o<Tr::kHeadDim, Tr::kLazyRescale>(o, alpha);
      convert_p<Tr>(pfrag, s);
    }
    // The first visible block's P V.
    wait_v(it);
    ptx::fence_operands(o);
    ptx::fence_operands(pfrag);
    take_turn();
    ptx::wgmma_fence();
    pv(it);
    ptx::wgmma_commit();
    pass_turn();
    ptx::wgmma_wait<0>();
    ptx::fence_operands(o);
    release(smem.empty_v(Slot<Tr>::of(it).stage));
    ++it;
  }
};

template <typename Tr, bool kScoreMod>
__global__ void __launch_bounds__(Tr::kThreads, 1) flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const SmemView<Tr> smem(smem_raw);

  if (threadIdx.x == 0) smem.init_barriers();
  __syncthreads();

  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform for the compiler
  if (wg == 0) {
    ptx::setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) produce<Tr>(p, smem);
  } else {
    ptx::setmaxnreg_inc<Tr::kConsumerRegs>();
    Consumer<Tr, kScoreMod> consumer{p, smem, wg - 1, int(threadIdx.x) % 128};
    consumer.run();
  }
#endif
}

}  // namespace flashattn::cuda::sm90
