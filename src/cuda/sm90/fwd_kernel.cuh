// FlashAttention forward for sm90a (Hopper): warp-specialised, TMA + wgmma.
//
// One CTA per (query block, head, sequence) of a fixed-length batch; kBlockM = 64 rows per
// consumer warpgroup. Warpgroup 0 is the producer (producer.cuh): one thread TMA-loads Q once and
// streams K and V blocks, last visible block first, through a kStages-deep shared-memory ring that
// hands stages over on mbarriers (smem.cuh). It gives most of its registers away (setmaxnreg).
// Each consumer warpgroup owns 64 query rows and, per key block:
//   S = Q K^T          wgmma, A and B from shared memory, fp32 accumulators in registers
//   mask               only blocks that cut some row's visible range (causal diagonal, edges)
//   online softmax     exp2 with the scale folded in; O *= alpha
//   O += P V           wgmma with P from registers (the S accumulators rounded to 16 bits)
// then O / l -> shared memory -> TMA store, and LSE (epilogue.cuh).
//
// Schedules (fwd_traits.h): kSerial runs the steps in order. kOverlap issues block j+1's Q K^T
// and block j's P V back to back and computes block j+1's softmax while P V runs. kPingPong adds
// turns between the two consumer warpgroups: each issues its GEMMs only after the other did, so
// the tensor cores alternate between them and each softmax hides under the other's GEMMs.
//
// Semantics come from core/mask.h (bottom-right causal / window); an empty row gives O = 0 and
// LSE = -inf.
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

namespace flashattn::cuda::sm90 {

template <typename Tr>
struct Consumer {
  static constexpr bool kPingPong = Tr::kSchedule == Schedule::kPingPong;

  const FwdParams& p;
  const SmemView<Tr>& smem;
  const BlockCoord& c;
  int wg;            // 0 .. kConsumerWGs - 1
  int thread_in_wg;  // 0 .. 127
  Mask mask;
  int64_t row0;      // sequence row of this thread's first row (the second is row0 + 8)

  float o[Tr::kHeadDim / 2];
  float s[Tr::kBlockN / 2];
  PFragment<Tr> pfrag;
  OnlineSoftmax<Tr::kBlockN> softmax;

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
    if (!mask.block_fully_visible(c.m0, c.m0 + c.rows, key0, key0 + Tr::kBlockN))
      mask_scores<Tr::kBlockN>(s, mask, row0, key0, thread_in_wg % 4);
    softmax.step(s, p.scale_log2, alpha);
  }

  // Block `it` of the ring: wait until its K (V) landed; issue the GEMM that reads it.
  __device__ void wait_k(int it) const {
    const Slot<Tr> slot = Slot<Tr>::of(it);
    ptx::mbarrier_wait(smem.full_k(slot.stage), slot.phase);
  }
  __device__ void wait_v(int it) const {
    const Slot<Tr> slot = Slot<Tr>::of(it);
    ptx::mbarrier_wait(smem.full_v(slot.stage), slot.phase);
  }
  __device__ __forceinline__ void qk(int it) {
    issue_qk<Tr>(s, smem_q_wg(), ptx::smem_addr(smem.k(Slot<Tr>::of(it).stage)));
  }
  __device__ __forceinline__ void pv(int it) {
    issue_pv<Tr>(o, pfrag, ptx::smem_addr(smem.v(Slot<Tr>::of(it).stage)));
  }

  __device__ void run() {
#pragma unroll
    for (int i = 0; i < Tr::kHeadDim / 2; ++i) o[i] = 0.0f;
    softmax.init();
    if constexpr (kPingPong) {
      // The first turn is warpgroup 0's: warpgroup 1 hands it over before it starts waiting.
      if (wg == 1) ptx::named_barrier_arrive(kBarrierPingPong0 + 0, 2 * 128);
    }
    if (c.n_end > c.n_begin) {
      ptx::mbarrier_wait(smem.full_q(), 0);
      if constexpr (Tr::kSchedule == Schedule::kSerial)
        mainloop_serial();
      else
        mainloop_overlapped();
    }
    if constexpr (kPingPong) {
      // Warpgroup 1 handed over one turn more than warpgroup 0 took: take it, so the barrier ends
      // the CTA balanced.
      if (wg == 0) ptx::named_barrier_sync(kBarrierPingPong0 + 0, 2 * 128);
    }
    store_o<Tr>(p, smem, o, softmax, c.m0, c.h, c.b, wg, thread_in_wg);
  }

  __device__ __forceinline__ void mainloop_serial() {
    int it = 0;
    for (int n = c.n_end - 1; n >= c.n_begin; --n, ++it) {
      const Slot<Tr> slot = Slot<Tr>::of(it);
      wait_k(it);
      ptx::fence_operands(s);
      ptx::wgmma_fence();
      qk(it);
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
      ptx::fence_operands(s);
      release(smem.empty_k(slot.stage));

      float alpha[2];
      scores_to_probs(n, alpha);
      rescale_o<Tr::kHeadDim>(o, alpha);
      convert_p<Tr>(pfrag, s);

      wait_v(it);
      ptx::fence_operands(o);
      ptx::fence_operands(pfrag);
      ptx::wgmma_fence();
      pv(it);
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
      ptx::fence_operands(o);
      release(smem.empty_v(slot.stage));
    }
  }

  __device__ __forceinline__ void mainloop_overlapped() {
    // The last visible block first: S, softmax, P; O is still zero (no rescale).
    int n = c.n_end - 1, it = 0;
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
      rescale_o<Tr::kHeadDim>(o, alpha);
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
  }
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const SmemView<Tr> smem(smem_raw);

  // Block -> (query block, head, sequence); under a causal mask the query blocks with the most
  // keys come first.
  int bid = blockIdx.x;
  BlockCoord c;
  c.m_block = p.m_blocks - 1 - bid % p.m_blocks;
  bid /= p.m_blocks;
  c.h = bid % p.heads;
  c.b = bid / p.heads;
  c.hk = c.h / p.group;
  c.m0 = c.m_block * Tr::kBlockM;
  c.rows = min(Tr::kBlockM, p.seqlen_q - c.m0);
  const Mask mask = p.mask();
  // Keys any row of the block sees (both bounds are monotone in the row).
  const int64_t key_lo = mask.key_begin(c.m0);
  const int64_t key_hi = mask.key_end(c.m0 + c.rows - 1);
  c.n_begin = int(key_lo / Tr::kBlockN);
  c.n_end = key_hi > key_lo ? int((key_hi + Tr::kBlockN - 1) / Tr::kBlockN) : c.n_begin;

  if (threadIdx.x == 0) smem.init_barriers();
  __syncthreads();

  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform for the compiler
  if (wg == 0) {
    ptx::setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0 && c.n_end > c.n_begin) produce<Tr>(p, smem, c);
  } else {
    ptx::setmaxnreg_inc<Tr::kConsumerRegs>();
    Consumer<Tr> consumer{p, smem, c, wg - 1, int(threadIdx.x) % 128, mask, 0};
    const int thread_in_wg = int(threadIdx.x) % 128;
    consumer.row0 = c.m0 + (wg - 1) * 64 + (thread_in_wg / 32) * 16 + (thread_in_wg % 32) / 4;
    consumer.run();
  }
#endif
}

}  // namespace flashattn::cuda::sm90
