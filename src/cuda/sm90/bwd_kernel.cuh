// FlashAttention backward for sm90a (Hopper): warp-specialised, TMA + wgmma.
//
// One CTA per (key block of 128 keys, kv head, sequence) of a fixed-length batch. Warpgroup 0 is
// the producer: one thread TMA-loads the CTA's K and V once, then for every (query head of the
// GQA group, query block that sees the keys) the block's Q, dO (tensor copies) and its LSE * log2e
// and D rows (bulk copies from the preprocess kernel's workspace) into a two-stage ring handed
// over on mbarriers. Each of the two consumer warpgroups owns 64 of the keys and, per query block,
// computes with the keys as the M of every product (bwd_traits.h):
//
//   S^T  = K Q^T,  dP^T = V dO^T        wgmma, A and B from shared memory (both K-major)
//   P^T  = exp2(S^T * scale*log2e - LSE*log2e[query]), 0 where the query does not see the key
//   dS^T = P^T * (dP^T - D[query])
//   dV  += P^T dO,  dK += dS^T Q        wgmma with P^T, dS^T from registers (16-bit A fragments)
//   dS^T -> shared memory; both warpgroups' halves written (named barrier), then
//   dQ   = dS K, a 64 x 64 share        wgmma, A = dS^T read transposed, B = K (both MN-major)
//   dQ  -> fp32 reductions (red.global.add) into the workspace
//
// then dK * scale and dV through shared memory and a TMA store (rows past the sequence clipped).
// The postprocess kernel turns the dQ accumulator into dQ * scale (sm80/bwd_prepost.cuh, shared
// with the sm80 backward, as are its workspace layout and the preprocess).
//
// Softcap and ALiBi (kScoreMod) transform the scores exactly as the forward does, and dS takes
// the softcap's derivative 1 - tanh^2. In deterministic mode the key blocks of a (sequence, kv head)
// add to each query block's dQ one at a time in decreasing order, behind a counter per (sequence,
// head, query block): the sm80 backward's scheme (sm80/bwd_dq_accum.cuh explains the order and why it
// cannot deadlock), with the consumer warpgroups taking the turn together.
//
// Query blocks that see none of the CTA's keys are never visited; keys no query sees get
// dK = dV = 0. Padding is exact: Q / dO rows past the sequence arrive as zeros with LSE*log2e =
// +inf (P = 0, dS = 0), K / V rows past it as zeros that the mask hides.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only)

#include <cstdint>

#include "core/params.h"
#include "cuda/common/ptx.h"
#include "cuda/common/bwd_workspace.cuh"
#include "cuda/sm90/fragment.h"
#include "cuda/sm90/bwd_traits.h"
#include "core/mask.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/wgmma_ops.h"

namespace flashattn::cuda::sm90 {

struct BwdKernelParams {
  // (head dim, rows, heads, batch) views; load boxes are 64 columns x kBlockM rows (q, dout) or
  // kBlockN rows (k, v); store boxes 64 x 64 (each consumer warpgroup stores its own keys).
  CUtensorMap tma_q, tma_k, tma_v, tma_do;
  CUtensorMap tma_dk, tma_dv;
  BwdParams p;
  BwdArgs args;
  Mask32 mask;  // every sequence's: a fixed-length batch
};

// Named barriers (0 is __syncthreads).
constexpr int kBwdBarrierDsReady = 1;   // both consumer warpgroups wrote their dS^T half
constexpr int kBwdBarrierKvFree = 2;    // both are done reading K and V (epilogue)
constexpr int kBwdBarrierStore0 = 3;    // + warpgroup: its dK / dV rows are in shared memory
constexpr int kBwdBarrierDqTurn = 5;    // deterministic mode: the dQ turn taken / passed

template <typename Tr>
struct BwdSmem {
  uint8_t* base;  // 1024-byte aligned

  __device__ explicit BwdSmem(uint8_t* raw)
      : base(reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023))) {}

  __device__ uint8_t* k() const { return base + Tr::kOffK; }
  __device__ uint8_t* v() const { return base + Tr::kOffV; }
  __device__ uint8_t* q(int stage) const { return base + Tr::kOffQ + stage * Tr::kQBytes; }
  __device__ uint8_t* dout(int stage) const { return base + Tr::kOffDo + stage * Tr::kQBytes; }
  __device__ uint8_t* ds(int buffer) const { return base + Tr::kOffDs + buffer * Tr::kDsBytes; }
  __device__ float* lse2(int stage) const {
    return reinterpret_cast<float*>(base + Tr::kOffLse) + stage * Tr::kBlockM;
  }
  __device__ float* delta(int stage) const {
    return reinterpret_cast<float*>(base + Tr::kOffDelta) + stage * Tr::kBlockM;
  }

  __device__ uint64_t* barriers() const { return reinterpret_cast<uint64_t*>(base + Tr::kOffBarriers); }
  __device__ uint64_t* full_kv() const { return barriers(); }
  __device__ uint64_t* full(int stage) const { return barriers() + 1 + stage; }
  __device__ uint64_t* empty(int stage) const { return barriers() + 1 + Tr::kStages + stage; }

  // One thread, before anyone else touches the barriers (a __syncthreads follows).
  __device__ void init_barriers() const {
    ptx::mbarrier_init(full_kv(), 1);
    for (int s = 0; s < Tr::kStages; ++s) {
      ptx::mbarrier_init(full(s), 1);                        // the producer's arrive_expect_tx
      ptx::mbarrier_init(empty(s), Tr::kConsumerThreads);    // every consumer thread
    }
    ptx::fence_barrier_init();
  }
};

// What one CTA does: its key block and the query blocks that see it.
template <typename Tr>
struct BwdWork {
  int b, hk, n_block, n0;
  int keys;              // valid keys of the block (the last block of a sequence may be short)
  int m_begin, m_count;  // query blocks [m_begin, m_begin + m_count) see some key of the block
  int group, steps;      // steps = group * m_count (query head, query block) pairs, head-major

  __device__ static BwdWork of(const BwdKernelParams& kp) {
    BwdWork w;
    int bid = int(blockIdx.x);
    // Key block fastest, 0 first: under a causal mask it is the one most query blocks see. In
    // deterministic mode the last one first: key blocks add to dQ in decreasing order, and a CTA
    // then only waits for CTAs that started before it.
    w.n_block = kp.p.deterministic ? kp.args.n_blocks - 1 - bid % kp.args.n_blocks : bid % kp.args.n_blocks;
    bid /= kp.args.n_blocks;
    w.hk = bid % kp.p.heads_k;
    w.b = bid / kp.p.heads_k;
    w.n0 = w.n_block * Tr::kBlockN;
    const Mask32& mask = kp.mask;
    w.keys = min(Tr::kBlockN, mask.seqlen_k - w.n0);
    // The rows that see a key of [n0, n0 + keys) form one range [lo, hi).
    const auto [lo, hi] = mask.rows_seeing(w.n0, w.n0 + w.keys);
    w.m_begin = lo / Tr::kBlockM;
    w.m_count = hi > lo ? (hi + Tr::kBlockM - 1) / Tr::kBlockM - w.m_begin : 0;
    w.group = kp.args.group;
    w.steps = w.group * w.m_count;
    return w;
  }

  __device__ int head(int step) const { return hk * group + step / m_count; }
  __device__ int m0(int step) const { return (m_begin + step % m_count) * Tr::kBlockM; }

};

// The producer: one thread issues every copy of the CTA.
template <typename Tr>
__device__ __forceinline__ void produce_bwd(const BwdKernelParams& kp, const BwdSmem<Tr>& smem,
                                            const BwdWork<Tr>& w) {
  ptx::prefetch_tensor_map(&kp.tma_q);
  ptx::prefetch_tensor_map(&kp.tma_do);
  ptx::mbarrier_arrive_expect_tx(smem.full_kv(), 2 * Tr::kKBytes);
#pragma unroll
  for (int ch = 0; ch < Tr::kChunks; ++ch) {
    ptx::tma_load_4d(smem.k() + ch * Tr::kKChunkBytes, &kp.tma_k, ch * 64, w.n0, w.hk, w.b, smem.full_kv());
    ptx::tma_load_4d(smem.v() + ch * Tr::kKChunkBytes, &kp.tma_v, ch * 64, w.n0, w.hk, w.b, smem.full_kv());
  }
  for (int step = 0; step < w.steps; ++step) {
    const int stage = step % Tr::kStages;
    const uint32_t phase = (step / Tr::kStages) & 1;
    const int h = w.head(step), m0 = w.m0(step);
    // A fresh barrier has "completed" the phase of parity 1: the first round does not wait.
    ptx::mbarrier_wait(smem.empty(stage), phase ^ 1);
    uint64_t* full = smem.full(stage);
    ptx::mbarrier_arrive_expect_tx(full, 2 * Tr::kQBytes + 2 * Tr::kBlockM * 4);
#pragma unroll
    for (int ch = 0; ch < Tr::kChunks; ++ch) {
      ptx::tma_load_4d(smem.q(stage) + ch * Tr::kQChunkBytes, &kp.tma_q, ch * 64, m0, h, w.b, full);
      ptx::tma_load_4d(smem.dout(stage) + ch * Tr::kQChunkBytes, &kp.tma_do, ch * 64, m0, h, w.b, full);
    }
    // The workspace pads every block to kBlockM rows: whole, 16-byte aligned and in bounds.
    const int64_t ws = kp.args.ws_index(kp.p, w.b, h, m0);
    ptx::bulk_load(smem.lse2(stage), kp.args.lse2 + ws, Tr::kBlockM * 4, full);
    ptx::bulk_load(smem.delta(stage), kp.args.delta + ws, Tr::kBlockM * 4, full);
  }
}

template <typename Tr, bool kScoreMod>
struct BwdConsumer {
  using T = typename Tr::Element;
  static constexpr int kBlockM = Tr::kBlockM, kHeadDim = Tr::kHeadDim;
  // A 16-bit A fragment per k16 slice of the queries (P^T, dS^T as the A of dV, dK += .. Q / dO).
  using Fragment = uint32_t[kBlockM / 16][4];

  const BwdKernelParams& kp;
  const BwdSmem<Tr>& smem;
  const BwdWork<Tr>& w;
  int wg;            // 0 or 1: keys [n0 + 64 wg, + 64)
  int thread_in_wg;  // 0 .. 127

  float dk[kHeadDim / 2];
  float dv[kHeadDim / 2];

  __device__ int warp() const { return thread_in_wg / 32; }
  __device__ int g() const { return (thread_in_wg % 32) / 4; }  // this thread's rows g, g + 8 of its warp's 16
  __device__ int t() const { return thread_in_wg % 4; }         // its column pair in each n8 tile

  // Every consumer thread tells the producer it is done with a stage. (Not lane 0 for its warp, as
  // in the forward, where only wgmma reads the stages: here each thread also reads LSE and D with
  // ordinary loads, and its own arrival is what orders those reads before the next copy into them.)
  __device__ void release(int stage) const { ptx::mbarrier_arrive(smem.empty(stage)); }

  __device__ void run() {
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) dk[i] = dv[i] = 0.0f;
    ptx::mbarrier_wait(smem.full_kv(), 0);
    for (int step = 0; step < w.steps; ++step) {
      const int stage = step % Tr::kStages;
      ptx::mbarrier_wait(smem.full(stage), (step / Tr::kStages) & 1);
      query_block(step, stage);
    }
    store_dkdv();
  }

  __device__ __forceinline__ void query_block(int step, int stage) {
    const int h = w.head(step), m0 = w.m0(step);
    const uint32_t k_rows = ptx::smem_addr(smem.k()) + wg * 64 * Tr::kRowBytes;
    const uint32_t v_rows = ptx::smem_addr(smem.v()) + wg * 64 * Tr::kRowBytes;
    const uint32_t q = ptx::smem_addr(smem.q(stage)), dout = ptx::smem_addr(smem.dout(stage));

    // S^T = K Q^T and dP^T = V dO^T: two groups, so the softmax of S^T starts while dP^T runs.
    float s[kBlockM / 2], dp[kBlockM / 2];
    ptx::wgmma_fence();
    gemm_kmajor(s, k_rows, q);
    ptx::wgmma_commit();
    gemm_kmajor(dp, v_rows, dout);
    ptx::wgmma_commit();

    const int r1 = min(m0 + kBlockM, kp.mask.seqlen_q);
    const bool need_mask = !kp.mask.block_fully_visible(m0, r1, w.n0, w.n0 + Tr::kBlockN);
    if constexpr (kScoreMod) {
      // The softcap's derivative is needed per element for dS: P and dS in one pass, after dP^T.
      ptx::wgmma_wait<0>();
      ptx::fence_operands(s);
      ptx::fence_operands(dp);
      modded_probabilities_and_grads(s, dp, smem.lse2(stage), smem.delta(stage), need_mask, m0, h);
    } else {
      ptx::wgmma_wait<1>();
      ptx::fence_operands(s);
      probabilities(s, smem.lse2(stage), need_mask, m0);
      ptx::wgmma_wait<0>();
      ptx::fence_operands(dp);
      score_grads(dp, s, smem.delta(stage));
    }

    Fragment pt, dst;
    to_fragment(pt, s);
    to_fragment(dst, dp);
    uint8_t* ds = smem.ds(step & 1);
    store_ds(ds, dst);
    ptx::fence_proxy_async_smem();  // our st.shared -> the next wgmma's reads
    ptx::named_barrier_sync(kBwdBarrierDsReady, Tr::kConsumerThreads);

    // dV += P^T dO, dK += dS^T Q (B = dO, Q as stored: MN-major); then this warpgroup's dQ share.
    float dq[32];
    ptx::fence_operands(dk);
    ptx::fence_operands(dv);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      using Mma = Wgmma<kHeadDim, T, 1>;
      // 16 queries = two 8-row groups (SBO 1024); 64-column chunks of dO / Q kQChunkBytes apart.
      Mma::rs(dv, pt[kk], ptx::make_smem_desc(dout + kk * 16 * Tr::kRowBytes, Tr::kQChunkBytes, 1024), true);
      Mma::rs(dk, dst[kk], ptx::make_smem_desc(q + kk * 16 * Tr::kRowBytes, Tr::kQChunkBytes, 1024), true);
    }
    ptx::wgmma_commit();
    // dQ rows [dq_row0, + 64) x columns [dq_col0, + 64): A = dS (queries x keys) from dS^T's
    // query chunk, B = K (keys x head dims) from K's column chunk; k16 = 16 key rows.
    const uint32_t ds_a = ptx::smem_addr(ds) + (Tr::kDqSplitsRows ? wg * Tr::kDsChunkBytes : 0);
    const uint32_t k_b = ptx::smem_addr(smem.k()) + (Tr::kDqSplitsRows ? 0 : wg * Tr::kKChunkBytes);
#pragma unroll
    for (int kk = 0; kk < Tr::kBlockN / 16; ++kk)
      Wgmma<64, T, 1>::template ss<1>(dq, ptx::make_smem_desc(ds_a + kk * 16 * Tr::kRowBytes, Tr::kDsChunkBytes, 1024),
                                      ptx::make_smem_desc(k_b + kk * 16 * Tr::kRowBytes, Tr::kKChunkBytes, 1024),
                                      kk > 0);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_operands(dk);
    ptx::fence_operands(dv);
    ptx::fence_operands(dq);
    release(stage);  // Q, dO, LSE and D of this stage are no longer read
    if (kp.p.deterministic) {
      take_dq_turn(h, m0);
      add_dq(dq, h, m0);
      pass_dq_turn(h, m0);
    } else {
      add_dq(dq, h, m0);
    }
  }

  // Deterministic mode: the counter of query block m0 / kBlockM of (b, h) counts the key blocks that
  // have added to it; this CTA's turn comes after every higher key block that the query block sees.
  __device__ int* dq_counter(int h, int m0) const {
    return kp.args.dq_semaphore + (int64_t(w.b) * kp.p.heads + h) * kp.args.m_blocks + m0 / Tr::kBlockM;
  }
  __device__ void take_dq_turn(int h, int m0) const {
    if (wg == 0 && thread_in_wg == 0) {
      // The block's rows see keys up to the last key of its last row that sees any (rows that see
      // nothing only lead or trail), and every key block from there down to ours adds before us.
      const int r1 = min(m0 + kBlockM, kp.mask.seqlen_q);
      const int past_last = kp.mask.rows_seeing(0, kp.mask.seqlen_k, m0, r1).end;
      const int rank = (kp.mask.key_end(past_last - 1) - 1) / Tr::kBlockN - w.n_block;
      const int* counter = dq_counter(h, m0);
      int seen;
      do {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
      } while (seen != rank);
    }
    ptx::named_barrier_sync(kBwdBarrierDqTurn, Tr::kConsumerThreads);
  }
  // Each thread's fence orders its reductions before the barrier, and so before the increment.
  __device__ void pass_dq_turn(int h, int m0) const {
    __threadfence();
    ptx::named_barrier_sync(kBwdBarrierDqTurn, Tr::kConsumerThreads);
    if (wg == 0 && thread_in_wg == 0) atomicAdd(dq_counter(h, m0), 1);
  }

  // acc (64 x kBlockM) = rows (64 x d, this warpgroup's keys) x cols^T (kBlockM x d); both K-major.
  __device__ __forceinline__ void gemm_kmajor(float (&acc)[kBlockM / 2], uint32_t rows, uint32_t cols) const {
    using Mma = Wgmma<kBlockM, T, 0>;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      // k16 step kk: chunk kk / 4, 32 bytes further per step inside the 128-byte swizzled row.
      const uint32_t offset_rows = (kk / 4) * Tr::kKChunkBytes + (kk % 4) * 32;
      const uint32_t offset_cols = (kk / 4) * Tr::kQChunkBytes + (kk % 4) * 32;
      Mma::ss(acc, ptx::make_smem_desc(rows + offset_rows, 16, 1024), ptx::make_smem_desc(cols + offset_cols, 16, 1024),
              kk > 0);
    }
  }

  // Element 4i + 2hh + e of an accumulator is key row g + 8hh of the warp's 16, query column
  // 8i + 2t + e of the block. The mask is Mask32's offset test (no per-query bounds held).
  __device__ __forceinline__ void probabilities(float (&s)[kBlockM / 2], const float* lse2, bool need_mask,
                                                int m0) const {
    const int key = w.n0 + wg * 64 + warp() * 16 + g();  // this thread's first key; the second is + 8
    const int lowest = kp.mask.lowest_offset(), highest = kp.mask.highest_offset();
    const bool key_valid[2] = {key < kp.mask.seqlen_k, key + 8 < kp.mask.seqlen_k};
#pragma unroll
    for (int i = 0; i < kBlockM / 8; ++i) {
      const int c = 8 * i + 2 * t();
      const float2 l = *reinterpret_cast<const float2*>(lse2 + c);  // +inf: the query sees no key
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float& x = s[acc_at(i, hh, e)];
          x = ptx::exp2_approx(fmaf(x, kp.args.scale_log2, -(e ? l.y : l.x)));
          if (need_mask) {
            const int offset = key + 8 * hh - (m0 + c + e);
            if (!key_valid[hh] || offset < lowest || offset > highest) x = 0.0f;
          }
        }
    }
  }

  // Softcap / ALiBi: P^T = exp2(log2e * mod(scale * S^T) - LSE*log2e[query]) in s and
  // dS^T = P^T (dP^T - D[query]) * d mod / d(scale * S^T) in dp, element by element.
  __device__ __forceinline__ void modded_probabilities_and_grads(float (&s)[kBlockM / 2], float (&dp)[kBlockM / 2],
                                                                 const float* lse2, const float* delta,
                                                                 bool need_mask, int m0, int h) const {
    constexpr float kLog2e = 1.4426950408889634f;
    const int key = w.n0 + wg * 64 + warp() * 16 + g();
    const int lowest = kp.mask.lowest_offset(), highest = kp.mask.highest_offset();
    const bool key_valid[2] = {key < kp.mask.seqlen_k, key + 8 < kp.mask.seqlen_k};
    const ScoreMod mod = kp.p.score_mod(w.b, h);
#pragma unroll
    for (int i = 0; i < kBlockM / 8; ++i) {
      const int c = 8 * i + 2 * t();
      const float2 l = *reinterpret_cast<const float2*>(lse2 + c);
      const float2 d = *reinterpret_cast<const float2*>(delta + c);
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int idx = acc_at(i, hh, e);
          const int offset = key + 8 * hh - (m0 + c + e);  // key - query
          float dscore;
          const float x = mod.apply(s[idx] * kp.p.scale, m0 + c + e, key + 8 * hh, kp.mask, dscore);
          float prob = ptx::exp2_approx(x * kLog2e - (e ? l.y : l.x));
          if (need_mask && (!key_valid[hh] || offset < lowest || offset > highest)) prob = 0.0f;
          s[idx] = prob;
          dp[idx] = prob * (dp[idx] - (e ? d.y : d.x)) * dscore;
        }
    }
  }

  // dP^T -> dS^T = P^T (dP^T - D[query]), in place.
  __device__ __forceinline__ void score_grads(float (&dp)[kBlockM / 2], const float (&p)[kBlockM / 2],
                                              const float* delta) const {
#pragma unroll
    for (int i = 0; i < kBlockM / 8; ++i) {
      const float2 d = *reinterpret_cast<const float2*>(delta + 8 * i + 2 * t());
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        dp[acc_at(i, hh)] = p[acc_at(i, hh)] * (dp[acc_at(i, hh)] - d.x);
        dp[acc_at(i, hh, 1)] = p[acc_at(i, hh, 1)] * (dp[acc_at(i, hh, 1)] - d.y);
      }
    }
  }

  // fp32 accumulator -> 16-bit A fragments: k16 slice kk covers n8 tiles 2kk and 2kk + 1, whose C
  // layout is the A layout of rows (g, g + 8) x columns (2t.., 2t + 8..).
  __device__ __forceinline__ static void to_fragment(Fragment& f, const float (&acc)[kBlockM / 2]) {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        f[kk][r] = ptx::pack2<T>(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
  }

  // dS^T (this warpgroup's 64 key rows) -> the dS buffer, [query chunk][key row][64 queries] in the
  // 128-byte swizzle: 16-byte chunk c of row r sits at c ^ (r % 8), and r % 8 = g for this
  // thread's rows.
  __device__ __forceinline__ void store_ds(uint8_t* ds, const Fragment& f) const {
    const int row = wg * 64 + warp() * 16 + g();
    const uint32_t row_addr = ptx::smem_addr(ds) + row * Tr::kRowBytes + t() * 4;
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int col = 16 * kk + 8 * (r / 2);  // the fragment's n8 tile: queries col + 2t, + 1
        const int hh = r % 2;                   // row g or g + 8
        const uint32_t addr = row_addr + (col / 64) * Tr::kDsChunkBytes + hh * 8 * Tr::kRowBytes +
                              ((((col % 64) / 8) ^ g()) * 16);
        ptx::st_shared_u32(addr, f[kk][r]);
      }
  }

  // This warpgroup's dQ share -> the fp32 workspace (the postprocess scales it by softmax_scale).
  __device__ __forceinline__ void add_dq(const float (&dq)[32], int h, int m0) const {
    const int row0 = (Tr::kDqSplitsRows ? wg * 64 : 0) + warp() * 16 + g();
    const int col0 = (Tr::kDqSplitsRows ? 0 : wg * 64) + 2 * t();
    float* acc = kp.args.dq_accum + (kp.args.ws_index(kp.p, w.b, h, m0) + row0) * kHeadDim + col0;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float* addr = acc + hh * 8 * kHeadDim + 8 * i;
        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(dq[acc_at(i, hh)]),
                     "f"(dq[acc_at(i, hh, 1)])
                     : "memory");
      }
  }

  // dK * scale and dV (rounded to the input dtype) into this warpgroup's rows of the K and V
  // buffers, once both warpgroups are done reading them, then one TMA store per 64-column chunk.
  __device__ __forceinline__ void store_dkdv() {
    ptx::named_barrier_sync(kBwdBarrierKvFree, Tr::kConsumerThreads);
    const int row = wg * 64 + warp() * 16 + g();
    const uint32_t k_row = ptx::smem_addr(smem.k()) + row * Tr::kRowBytes + t() * 4;
    const uint32_t v_row = ptx::smem_addr(smem.v()) + row * Tr::kRowBytes + t() * 4;
    const float scale = kp.p.scale;
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const uint32_t offset = (i / 8) * Tr::kKChunkBytes + hh * 8 * Tr::kRowBytes + (((i % 8) ^ g()) * 16);
        ptx::st_shared_u32(k_row + offset, ptx::pack2<T>(dk[acc_at(i, hh)] * scale,
                                                                           dk[acc_at(i, hh, 1)] * scale));
        ptx::st_shared_u32(v_row + offset, ptx::pack2<T>(dv[acc_at(i, hh)], dv[acc_at(i, hh, 1)]));
      }
    ptx::fence_proxy_async_smem();
    ptx::named_barrier_sync(kBwdBarrierStore0 + wg, 128);
    const int key0 = w.n0 + wg * 64;
    if (thread_in_wg == 0) {
      if (key0 < kp.mask.seqlen_k) {
#pragma unroll
        for (int ch = 0; ch < Tr::kChunks; ++ch) {
          const uint32_t offset = ch * Tr::kKChunkBytes + wg * 64 * Tr::kRowBytes;
          ptx::tma_store_4d(&kp.tma_dk, ch * 64, key0, w.hk, w.b, smem.k() + offset);
          ptx::tma_store_4d(&kp.tma_dv, ch * 64, key0, w.hk, w.b, smem.v() + offset);
        }
      }
      ptx::tma_store_commit();
      ptx::tma_store_wait_all();  // before the CTA's shared memory goes away
    }
  }
};

// Keys that no query sees: dK = dV = 0, written by the whole CTA with plain stores.
template <typename Tr>
__device__ void zero_dkdv(const BwdKernelParams& kp, const BwdWork<Tr>& w) {
  using T = typename Tr::Element;
  const BwdParams& p = kp.p;
  const int qk_chunks = p.head_dim / 8, v_chunks = p.head_dim_v / 8;
  const int chunks = qk_chunks > v_chunks ? qk_chunks : v_chunks;
  for (int idx = threadIdx.x; idx < w.keys * chunks; idx += Tr::kThreads) {
    const int64_t j = w.n0 + idx / chunks;
    const int chunk = idx % chunks;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    if (chunk < qk_chunks) *reinterpret_cast<uint4*>(static_cast<T*>(p.dk) + p.dk_offset(w.b, j, w.hk) + chunk * 8) = zero;
    if (chunk < v_chunks) *reinterpret_cast<uint4*>(static_cast<T*>(p.dv) + p.dv_offset(w.b, j, w.hk) + chunk * 8) = zero;
  }
}

// kScoreMod: softcap and/or ALiBi present (their code stays out of the plain kernel).
template <typename Tr, bool kScoreMod>
__global__ void __launch_bounds__(Tr::kThreads, 1) flash_bwd_sm90_kernel(const __grid_constant__ BwdKernelParams kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const BwdWork<Tr> w = BwdWork<Tr>::of(kp);
  if (w.m_count == 0) return zero_dkdv<Tr>(kp, w);

  extern __shared__ uint8_t smem_raw[];
  const BwdSmem<Tr> smem(smem_raw);
  if (threadIdx.x == 0) smem.init_barriers();
  __syncthreads();

  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform for the compiler
  if (wg == 0) {
    ptx::setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) produce_bwd<Tr>(kp, smem, w);
  } else {
    ptx::setmaxnreg_inc<Tr::kConsumerRegs>();
    BwdConsumer<Tr, kScoreMod> consumer{kp, smem, w, wg - 1, int(threadIdx.x) % 128};
    consumer.run();
  }
#endif
}

}  // namespace flashattn::cuda::sm90
