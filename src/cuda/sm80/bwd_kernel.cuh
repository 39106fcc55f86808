// FlashAttention-2 backward for sm80+ (mma.sync, ldmatrix, cp.async): one CTA per
// (key block, kv head, sequence). The CTA keeps its K and V block in smem and its dK, dV in
// registers, and walks every (query head of the GQA group, query block) that sees its keys:
//
//   Q, dO, LSE*log2(e), D of the block -> smem   cp.async, the next block's while this one computes
//   S  = Q K^T,  dP = dO V^T                     ldmatrix + mma.m16n8k16, fp32 in registers
//   P  = exp2(S * scale*log2(e) - LSE*log2(e))   the forward's probabilities, recomputed (softcap,
//                                                ALiBi and the mask exactly as the forward applies them)
//   dS = P * (dP - D)                            times 1 - tanh^2 under a softcap
//   P, dS -> smem (the input dtype)
//   dV += P^T dO,  dK += dS^T Q                  registers, summed over the group's query heads
//   dQ += dS K                                   fp32 reductions into the workspace (bwd_dq_accum.cuh)
//
// and finally writes dK * scale and dV. D and the LSE in the log2 domain come from the preprocess
// kernel, dQ * scale in the input dtype from the postprocess (bwd_prepost.cuh). Query blocks that
// see none of the CTA's keys (causal, window, varlen) are never visited; a key block that no query
// sees gets dK = dV = 0.
//
// Semantics come from core/params.h and core/mask.h, shared with the forward, the CPU backward and
// the oracle.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/params.h"
#include "cuda/common/ptx.h"
#include "cuda/common/bwd_dq_accum.cuh"
#include "cuda/sm80/bwd_tile_size.h"
#include "cuda/common/bwd_workspace.cuh"
#include "cuda/sm80/fwd_kernel.cuh"  // detail::load_tile, kLog2e

namespace flashattn::cuda::sm80 {

template <int kHeadDim_, typename Element_, BwdTile kTile_>
struct BwdTraits {
  using Element = Element_;
  static constexpr BwdTile kTile = kTile_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kTile.min_blocks;
  static constexpr int kStages = kTile.stages;
  static constexpr int kChunks = kHeadDim / 8;     // 16-byte chunks per row
  // Rows of Q, dO, K, V (and of P, dS) get one extra 16-byte chunk: an odd number of chunks per
  // row puts the 8 row addresses of an ldmatrix in 8 different bank groups.
  static constexpr int kRowPitch = kHeadDim + 8;  // elements
  static constexpr int kPPitch = kBlockN + 8;

  // S / dP: warp tile kSdpRows queries x kSdpCols keys
  static constexpr int kSdpWarpsM = kTile.sdp_warps_m, kSdpWarpsN = kWarps / kSdpWarpsM;
  static constexpr int kSdpRows = kBlockM / kSdpWarpsM, kSdpCols = kBlockN / kSdpWarpsN;
  static constexpr int kSdpMTiles = kSdpRows / 16, kSdpNTiles = kSdpCols / 8;
  // dK / dV: warp tile kKvRows keys x kKvCols head dims
  static constexpr int kKvWarpsN = kTile.dkv_warps_n, kKvWarpsD = kWarps / kKvWarpsN;
  static constexpr int kKvRows = kBlockN / kKvWarpsN, kKvCols = kHeadDim / kKvWarpsD;
  static constexpr int kKvMTiles = kKvRows / 16, kKvNTiles = kKvCols / 8;
  // dQ: warp tile kDqRows queries x kDqCols head dims
  static constexpr int kDqWarpsM = kTile.dq_warps_m, kDqWarpsD = kWarps / kDqWarpsM;
  static constexpr int kDqRows = kBlockM / kDqWarpsM, kDqCols = kHeadDim / kDqWarpsD;
  static constexpr int kDqMTiles = kDqRows / 16, kDqNTiles = kDqCols / 8;

  // Shared memory, in this order: LSE*log2e and D (fp32, kStages x kBlockM each), K, V,
  // kStages x Q, kStages x dO, P, dS.
  static constexpr int kSmemRowStats = 2 * kStages * kBlockM;  // floats
  static constexpr int kSmemKV = kBlockN * kRowPitch;           // elements, K (or V)
  static constexpr int kSmemQ = kBlockM * kRowPitch;            // elements, one stage of Q (or dO)
  static constexpr int kSmemP = kBlockM * kPPitch;              // elements, P (or dS)
  static constexpr int kSmemBytes =
      kSmemRowStats * 4 + (2 * kSmemKV + 2 * kStages * kSmemQ + 2 * kSmemP) * int(sizeof(Element));

  static_assert(kHeadDim % 16 == 0, "head dim tiles are k16 slices of S = Q K^T");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "dV/dK and dQ consume k16 slices of queries / keys");
  static_assert(kWarps % kSdpWarpsM == 0 && kWarps % kKvWarpsN == 0 && kWarps % kDqWarpsM == 0,
                "warp grids cover the warps");
  static_assert(kSdpRows % 16 == 0 && kKvRows % 16 == 0 && kDqRows % 16 == 0, "warps own whole m16 tiles");
  static_assert(kSdpCols % 16 == 0 && kKvCols % 16 == 0 && kDqCols % 16 == 0,
                "B operands come as ldmatrix.x4 pairs of n8 tiles");
  static_assert((kBlockM * kChunks) % kThreads == 0 && (kBlockN * kChunks) % kThreads == 0,
                "tile loads and the dK/dV stores are whole 16-byte chunks per thread");
  static_assert(kBlockM / 2 <= kThreads, "LSE and D of a block load as 16-byte chunks, one per thread");
  static_assert(kStages == 1 || kStages == 2, "one or two Q/dO buffers");
  static_assert(kSmemBytes <= kBwdLargeSmemBytes, "must fit the shared memory per block of sm90");
};

namespace detail {

// ldmatrix lane addresses (element offsets in a row-major tile of pitch `pitch`): lanes 8i..8i+7
// give the rows of matrix i.
// Pattern "rows": lanes 0-7 rows 0-7, 8-15 rows 8-15, 16-31 the same at column +8. Serves an A
// operand stored [m][k] (ldmatrix), and a B operand stored [k][n] (ldmatrix.trans: n8 tiles 0, 1
// in registers {0,1}, {2,3}).
__device__ __forceinline__ int lane_rows_pattern(int lane, int pitch) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * pitch + (lane >> 4) * 8;
}
// Pattern "pairs": lanes 0-15 rows 0-7 at columns +0 / +8, 16-31 rows 8-15. Serves a B operand
// stored [n][k] (ldmatrix: n8 tiles 0, 1 in registers {0,1}, {2,3}), and an A operand stored
// [k][m] (ldmatrix.trans: the transpose of the stored tile, e.g. P^T from P).
__device__ __forceinline__ int lane_pairs_pattern(int lane, int pitch) {
  return ((lane & 7) + (lane >> 4) * 8) * pitch + ((lane >> 3) & 1) * 8;
}


}  // namespace detail

// kScoreMod: softcap and/or ALiBi present (their code stays out of the plain kernel).
// kDeterministic: dQ is added in key-block order (bwd_dq_accum.cuh).
template <typename Tr, bool kScoreMod, bool kDeterministic>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) flash_bwd_kernel(const __grid_constant__ BwdParams p,
                                                                     const BwdArgs args) {
  using T = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kRowPitch, kPPitch = Tr::kPPitch;

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // row group and thread-in-group of the MMA fragments

  // Block -> (key block, kv head, sequence), the key block varying fastest. Key block 0 (the one
  // most query blocks see under a causal mask) starts first; in deterministic mode the last one
  // does: key blocks add to dQ in decreasing order, and a CTA only ever waits for CTAs that
  // started before it (bwd_dq_accum.cuh).
  int64_t bid = blockIdx.x;
  const int n_block = kDeterministic ? args.n_blocks - 1 - int(bid % args.n_blocks) : int(bid % args.n_blocks);
  bid /= args.n_blocks;
  const int hk = int(bid % p.heads_k);
  const int b = int(bid / p.heads_k);

  const int64_t len_q = p.len_q(b);
  const int64_t len_k = p.len_k(b);
  const int64_t n0 = int64_t(n_block) * kBlockN;
  if (n0 >= len_k) return;  // varlen: this sequence is shorter than the longest one
  const int64_t keys = len_k - n0 < kBlockN ? len_k - n0 : kBlockN;  // valid keys of this block
  // The mask in int arithmetic (seqlen_q + seqlen_k < 2^31 on CUDA).
  const Mask32 mask = Mask32::make(len_q, len_k, p.window_left, p.window_right);

  // Query rows that see a key of [n0, n0 + keys) (one range); whole query blocks around it.
  const auto [row_lo, row_hi] = mask.rows_seeing(int(n0), int(n0 + keys));
  const int m_begin = int(row_lo / kBlockM);
  const int m_count = row_hi > row_lo ? int((row_hi + kBlockM - 1) / kBlockM) - m_begin : 0;

  T* gmem_dk = static_cast<T*>(p.dk);
  T* gmem_dv = static_cast<T*>(p.dv);
  const int qk_chunks = p.head_dim / 8, v_chunks = p.head_dim_v / 8;

  if (m_count == 0) {  // keys no query sees: dK = dV = 0
    for (int idx = tid; idx < keys * Tr::kChunks; idx += Tr::kThreads) {
      const int64_t j = n0 + idx / Tr::kChunks;
      const int chunk = idx % Tr::kChunks;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      if (chunk < qk_chunks) *reinterpret_cast<uint4*>(gmem_dk + p.dk_offset(b, j, hk) + chunk * 8) = zero;
      if (chunk < v_chunks) *reinterpret_cast<uint4*>(gmem_dv + p.dv_offset(b, j, hk) + chunk * 8) = zero;
    }
    return;
  }

  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* smem_lse2 = reinterpret_cast<float*>(smem_raw);  // kStages x kBlockM
  float* smem_delta = smem_lse2 + Tr::kStages * kBlockM;    // kStages x kBlockM
  T* smem_k = reinterpret_cast<T*>(smem_delta + Tr::kStages * kBlockM);
  T* smem_v = smem_k + Tr::kSmemKV;
  T* smem_q = smem_v + Tr::kSmemKV;           // kStages
  T* smem_do = smem_q + Tr::kStages * Tr::kSmemQ;  // kStages
  T* smem_p = smem_do + Tr::kStages * Tr::kSmemQ;
  T* smem_ds = smem_p + Tr::kSmemP;

  // K and V of this block, once.
  detail::load_tile<Tr, kBlockN>(smem_k, static_cast<const T*>(p.k) + p.k_offset(b, n0, hk), p.k_stride.row, keys,
                                 qk_chunks, p.k, tid);
  detail::load_tile<Tr, kBlockN>(smem_v, static_cast<const T*>(p.v) + p.v_offset(b, n0, hk), p.v_stride.row, keys,
                                 v_chunks, p.v, tid);

  // Step `it` of the query loop: query head h0 + it / m_count, query block m_begin + it % m_count.
  const int h0 = hk * args.group;
  const int steps = args.group * m_count;
  auto load_step = [&](int it, int stage) {
    const int h = h0 + it / m_count;
    const int64_t m0 = int64_t(m_begin + it % m_count) * kBlockM;
    const int64_t rows = len_q - m0;  // rows past it are zero-filled
    detail::load_tile<Tr, kBlockM>(smem_q + stage * Tr::kSmemQ, static_cast<const T*>(p.q) + p.q_offset(b, m0, h),
                                   p.q_stride.row, rows, qk_chunks, p.q, tid);
    detail::load_tile<Tr, kBlockM>(smem_do + stage * Tr::kSmemQ,
                                   static_cast<const T*>(p.dout) + p.dout_offset(b, m0, h), p.dout_stride.row, rows,
                                   v_chunks, p.dout, tid);
    // The workspace pads every block to kBlockM rows: always whole, aligned and in bounds.
    const int64_t w = args.ws_index(p, b, h, m0);
    constexpr int kQuads = kBlockM / 4;
    if (tid < kQuads)
      ptx::cp_async_16(ptx::smem_addr(smem_lse2 + stage * kBlockM + tid * 4), args.lse2 + w + tid * 4, true);
    else if (tid < 2 * kQuads)
      ptx::cp_async_16(ptx::smem_addr(smem_delta + stage * kBlockM + (tid - kQuads) * 4),
                       args.delta + w + (tid - kQuads) * 4, true);
  };
  load_step(0, 0);
  ptx::cp_async_commit();

  // Warp tiles of the three products.
  const int sdp_row0 = (warp / Tr::kSdpWarpsN) * Tr::kSdpRows;  // queries
  const int sdp_col0 = (warp % Tr::kSdpWarpsN) * Tr::kSdpCols;  // keys
  const int kv_row0 = (warp / Tr::kKvWarpsD) * Tr::kKvRows;     // keys
  const int kv_col0 = (warp % Tr::kKvWarpsD) * Tr::kKvCols;     // head dims
  const int dq_row0 = (warp / Tr::kDqWarpsD) * Tr::kDqRows;     // queries
  const int dq_col0 = (warp % Tr::kDqWarpsD) * Tr::kDqCols;     // head dims

  // ldmatrix lane addresses (bytes, shared window), stage 0.
  const int rows_lane = detail::lane_rows_pattern(lane, kPitch);
  const int pairs_lane = detail::lane_pairs_pattern(lane, kPitch);
  const uint32_t q_a = ptx::smem_addr(smem_q + sdp_row0 * kPitch + rows_lane);       // S: A = Q
  const uint32_t do_a = ptx::smem_addr(smem_do + sdp_row0 * kPitch + rows_lane);     // dP: A = dO
  const uint32_t k_b = ptx::smem_addr(smem_k + sdp_col0 * kPitch + pairs_lane);      // S: B = K^T
  const uint32_t v_b = ptx::smem_addr(smem_v + sdp_col0 * kPitch + pairs_lane);      // dP: B = V^T
  const uint32_t pt_a = ptx::smem_addr(smem_p + kv_row0 + detail::lane_pairs_pattern(lane, kPPitch));   // P^T
  const uint32_t dst_a = ptx::smem_addr(smem_ds + kv_row0 + detail::lane_pairs_pattern(lane, kPPitch));  // dS^T
  const uint32_t do_b = ptx::smem_addr(smem_do + kv_col0 + rows_lane);               // dV: B = dO
  const uint32_t q_b = ptx::smem_addr(smem_q + kv_col0 + rows_lane);                 // dK: B = Q
  const uint32_t ds_a = ptx::smem_addr(smem_ds + dq_row0 * kPPitch + detail::lane_rows_pattern(lane, kPPitch));
  const uint32_t k_bt = ptx::smem_addr(smem_k + dq_col0 + rows_lane);                // dQ: B = K
  constexpr uint32_t kStageBytes = Tr::kSmemQ * sizeof(T);

  float acc_dk[Tr::kKvMTiles][Tr::kKvNTiles][4];
  float acc_dv[Tr::kKvMTiles][Tr::kKvNTiles][4];
#pragma unroll
  for (int mt = 0; mt < Tr::kKvMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < Tr::kKvNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[mt][nt][e] = acc_dv[mt][nt][e] = 0.0f;

  for (int it = 0; it < steps; ++it) {
    const int stage = Tr::kStages == 2 ? (it & 1) : 0;
    const int h = h0 + it / m_count;
    const int m_block = m_begin + it % m_count;
    const int64_t m0 = int64_t(m_block) * kBlockM;
    const int64_t rows = len_q - m0 < kBlockM ? len_q - m0 : kBlockM;

    // This step's Q, dO, LSE, D landed; every warp is done with the previous step's smem.
    ptx::cp_async_wait<0>();
    __syncthreads();
    if constexpr (Tr::kStages == 2) {
      if (it + 1 < steps) load_step(it + 1, stage ^ 1);
      ptx::cp_async_commit();
    }

    // S = Q K^T and dP = dO V^T, one k16 slice of both at a time.
    float s[Tr::kSdpMTiles][Tr::kSdpNTiles][4], dp[Tr::kSdpMTiles][Tr::kSdpNTiles][4];
#pragma unroll
    for (int mt = 0; mt < Tr::kSdpMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < Tr::kSdpNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < Tr::kHeadDim / 16; ++kk) {
      uint32_t aq[Tr::kSdpMTiles][4], ado[Tr::kSdpMTiles][4];
#pragma unroll
      for (int mt = 0; mt < Tr::kSdpMTiles; ++mt) {
        ptx::ldmatrix_x4(aq[mt], q_a + stage * kStageBytes + (mt * 16 * kPitch + kk * 16) * sizeof(T));
        ptx::ldmatrix_x4(ado[mt], do_a + stage * kStageBytes + (mt * 16 * kPitch + kk * 16) * sizeof(T));
      }
#pragma unroll
      for (int np = 0; np < Tr::kSdpNTiles / 2; ++np) {
        uint32_t bk[4], bv[4];
        ptx::ldmatrix_x4(bk, k_b + (np * 16 * kPitch + kk * 16) * sizeof(T));
        ptx::ldmatrix_x4(bv, v_b + (np * 16 * kPitch + kk * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < Tr::kSdpMTiles; ++mt) {
          ptx::mma_16816<T>(s[mt][2 * np], aq[mt], bk[0], bk[1]);
          ptx::mma_16816<T>(s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
          ptx::mma_16816<T>(dp[mt][2 * np], ado[mt], bv[0], bv[1]);
          ptx::mma_16816<T>(dp[mt][2 * np + 1], ado[mt], bv[2], bv[3]);
        }
      }
    }

    // P and dS, elementwise; then both to smem in the input dtype. Thread rows: (m tile mt,
    // half hh) is block row sdp_row0 + 16 mt + 8 hh + g; columns sdp_col0 + 8 nt + 2 t + {0, 1}.
    const bool need_mask = !mask.block_fully_visible(int(m0), int(m0 + rows), int(n0), int(n0) + kBlockN);
    const int row0 = int(m0) + sdp_row0 + g;
    const ScoreMod mod = kScoreMod ? p.score_mod(b, h) : ScoreMod{};
#pragma unroll
    for (int mt = 0; mt < Tr::kSdpMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = sdp_row0 + mt * 16 + hh * 8 + g;
        const float lse2 = smem_lse2[stage * kBlockM + r];  // +inf: the row sees no key (P = 0)
        const float delta = smem_delta[stage * kBlockM + r];
        // Visible keys [begin, end) of this row relative to n0.
        const int row = row0 + mt * 16 + hh * 8;
        const int begin = mask.key_begin(row) - int(n0);
        const int end = mask.key_end(row) - int(n0);
#pragma unroll
        for (int nt = 0; nt < Tr::kSdpNTiles; ++nt) {
          float pr[2], ds[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = sdp_col0 + nt * 8 + 2 * t + e;
            const float x_raw = s[mt][nt][2 * hh + e];
            float dscore = 1.0f;  // d(transformed score) / d(scale * q.k)
            float x2;             // the score in the log2 domain
            if constexpr (kScoreMod) {
              x2 = mod.apply(x_raw * p.scale, row, int(n0) + c, mask, dscore) * detail::kLog2e;
            } else {
              x2 = x_raw * args.scale_log2;
            }
            float prob = ptx::exp2_approx(x2 - lse2);
            if (need_mask && (c < begin || c >= end)) prob = 0.0f;
            pr[e] = prob;
            ds[e] = prob * (dp[mt][nt][2 * hh + e] - delta) * dscore;
          }
          *reinterpret_cast<uint32_t*>(smem_p + r * kPPitch + sdp_col0 + nt * 8 + 2 * t) = ptx::pack2<T>(pr[0], pr[1]);
          *reinterpret_cast<uint32_t*>(smem_ds + r * kPPitch + sdp_col0 + nt * 8 + 2 * t) = ptx::pack2<T>(ds[0], ds[1]);
        }
      }
    __syncthreads();  // P and dS of the whole block are in smem

    // dV += P^T dO and dK += dS^T Q over this block's queries (k16 slices of them).
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t apt[Tr::kKvMTiles][4], adst[Tr::kKvMTiles][4];
#pragma unroll
      for (int mt = 0; mt < Tr::kKvMTiles; ++mt) {
        ptx::ldmatrix_x4_trans(apt[mt], pt_a + (kk * 16 * kPPitch + mt * 16) * sizeof(T));
        ptx::ldmatrix_x4_trans(adst[mt], dst_a + (kk * 16 * kPPitch + mt * 16) * sizeof(T));
      }
#pragma unroll
      for (int np = 0; np < Tr::kKvNTiles / 2; ++np) {
        uint32_t bdo[4], bq[4];
        ptx::ldmatrix_x4_trans(bdo, do_b + stage * kStageBytes + (kk * 16 * kPitch + np * 16) * sizeof(T));
        ptx::ldmatrix_x4_trans(bq, q_b + stage * kStageBytes + (kk * 16 * kPitch + np * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < Tr::kKvMTiles; ++mt) {
          ptx::mma_16816<T>(acc_dv[mt][2 * np], apt[mt], bdo[0], bdo[1]);
          ptx::mma_16816<T>(acc_dv[mt][2 * np + 1], apt[mt], bdo[2], bdo[3]);
          ptx::mma_16816<T>(acc_dk[mt][2 * np], adst[mt], bq[0], bq[1]);
          ptx::mma_16816<T>(acc_dk[mt][2 * np + 1], adst[mt], bq[2], bq[3]);
        }
      }
    }

    // dQ (this block's share) = dS K over the CTA's keys, then into the fp32 workspace.
    float acc_dq[Tr::kDqMTiles][Tr::kDqNTiles][4];
#pragma unroll
    for (int mt = 0; mt < Tr::kDqMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < Tr::kDqNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[mt][nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t ads[Tr::kDqMTiles][4];
#pragma unroll
      for (int mt = 0; mt < Tr::kDqMTiles; ++mt)
        ptx::ldmatrix_x4(ads[mt], ds_a + (mt * 16 * kPPitch + kk * 16) * sizeof(T));
#pragma unroll
      for (int np = 0; np < Tr::kDqNTiles / 2; ++np) {
        uint32_t bk[4];
        ptx::ldmatrix_x4_trans(bk, k_bt + (kk * 16 * kPitch + np * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < Tr::kDqMTiles; ++mt) {
          ptx::mma_16816<T>(acc_dq[mt][2 * np], ads[mt], bk[0], bk[1]);
          ptx::mma_16816<T>(acc_dq[mt][2 * np + 1], ads[mt], bk[2], bk[3]);
        }
      }
    }
    DqAccumulator<kDeterministic> dq_out;
    if constexpr (kDeterministic) {
      // Turn of this key block: the query block sees keys up to the last key of its last non-empty
      // row (rows that see nothing only lead or trail), and the key blocks add from that one down.
      const int past_last = mask.rows_seeing(0, int(len_k), int(m0), int(m0 + rows)).end;
      const int rank = int((mask.key_end(past_last - 1) - 1) / kBlockN) - n_block;
      dq_out.begin(args.dq_semaphore + (int64_t(b) * p.heads + h) * args.m_blocks + m_block, rank);
    }
    float* dq_ws = args.dq_accum + args.ws_index(p, b, h, m0) * Tr::kHeadDim;
#pragma unroll
    for (int mt = 0; mt < Tr::kDqMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float* dq_row = dq_ws + (dq_row0 + mt * 16 + hh * 8 + g) * Tr::kHeadDim + dq_col0 + 2 * t;
#pragma unroll
        for (int nt = 0; nt < Tr::kDqNTiles; ++nt)
          dq_out.add2(dq_row + nt * 8, acc_dq[mt][nt][2 * hh], acc_dq[mt][nt][2 * hh + 1]);
      }
    dq_out.end();

    if constexpr (Tr::kStages == 1) {  // the single Q/dO buffer is free only now
      if (it + 1 < steps) {
        __syncthreads();
        load_step(it + 1, 0);
        ptx::cp_async_commit();
      }
    }
  }

  // Epilogue: dK * scale and dV into the (now free) K and V smem, then 16-byte coalesced stores of
  // the valid keys and head dims.
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < Tr::kKvMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = kv_row0 + mt * 16 + hh * 8 + g;
#pragma unroll
      for (int nt = 0; nt < Tr::kKvNTiles; ++nt) {
        const int c = kv_col0 + nt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(smem_k + r * kPitch + c) =
            ptx::pack2<T>(acc_dk[mt][nt][2 * hh] * p.scale, acc_dk[mt][nt][2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(smem_v + r * kPitch + c) =
            ptx::pack2<T>(acc_dv[mt][nt][2 * hh], acc_dv[mt][nt][2 * hh + 1]);
      }
    }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kBlockN * Tr::kChunks / Tr::kThreads; ++i) {
    const int idx = tid + i * Tr::kThreads;
    const int r = idx / Tr::kChunks, chunk = idx % Tr::kChunks;
    if (r >= keys) continue;
    if (chunk < qk_chunks)
      *reinterpret_cast<uint4*>(gmem_dk + p.dk_offset(b, n0 + r, hk) + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem_k + r * kPitch + chunk * 8);
    if (chunk < v_chunks)
      *reinterpret_cast<uint4*>(gmem_dv + p.dv_offset(b, n0 + r, hk) + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem_v + r * kPitch + chunk * 8);
  }
}

}  // namespace flashattn::cuda::sm80
