// FlashAttention-2 forward for sm80+ (mma.sync, ldmatrix, cp.async): one CTA per
// (query block, head, sequence), each warp owning kWarpRows consecutive query rows.
//
//   Q tile -> smem once; K/V tiles stream through a 2-stage cp.async ring in smem.
//   per key block (last visible block first, so the masked diagonal/boundary blocks come early):
//     S = Q K^T            ldmatrix (Q, K) + mma.m16n8k16, fp32 in registers
//     S -> log2 domain     scale * log2(e) folded in; softcap, ALiBi, mask (-inf) when needed
//     online softmax       row max / sum across the 4 lanes of a row with two shuffles
//     O += P V             P rounded to the input dtype in registers = the A fragments;
//                          V through ldmatrix.trans
//   O / l -> smem (the warp's own Q rows) -> 16-byte coalesced stores; LSE = ln2 * (m + log2 l).
//
// Semantics come from core/params.h and core/mask.h (shared with the CPU and the oracle):
// bottom-right causal/window, varlen offsets, GQA, strides; an empty row gives O = 0, LSE = -inf.
//
// Split-KV (kSplit): CTA (..., split) walks only the key blocks of its split and writes O / l and
// the LSE in fp32 to the split's partial slot; the merge kernel combines the splits (split_kv.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/params.h"
#include "cuda/common/ptx.h"
#include "cuda/sm80/tile_size.h"
#include "cuda/split_kv.h"

namespace flashattn::cuda::sm80 {

template <int kHeadDim_, typename Element_, bool kLargeSmem_ = false>
struct FwdTraits {
  using Element = Element_;
  static constexpr bool kLargeSmem = kLargeSmem_;
  static constexpr FwdTile kTile = fwd_tile(kHeadDim_, kLargeSmem_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;     // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of O per warp
  static constexpr int kChunks = kHeadDim / 8;    // 16-byte chunks per row
  // One extra 16-byte chunk per row: the row pitch becomes an odd number of chunks, so the 8
  // row addresses of an ldmatrix (and of the epilogue's stores) fall in 8 different bank groups.
  static constexpr int kRowPitch = kHeadDim + 8;  // elements
  static constexpr int kSmemQ = kBlockM * kRowPitch;
  static constexpr int kSmemKV = kBlockN * kRowPitch;  // one stage of K (or V)
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * int(sizeof(Element));

  static_assert(kHeadDim % 16 == 0, "head dim tiles are k16 slices of the QK^T product");
  static_assert(kWarpRows % 16 == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0, "P V consumes keys in k16 slices");
  static_assert((kBlockM * kChunks) % kThreads == 0 && (kBlockN * kChunks) % kThreads == 0,
                "tile loads are whole 16-byte chunks per thread");
  static_assert((kWarpRows * kChunks) % 32 == 0, "the epilogue stores whole chunks per lane");
  static_assert(kSmemBytes <= (kLargeSmem ? kLargeSmemBytes : kSmallSmemBytes),
                "must fit the shared memory per block of the targeted GPUs");
};

// Scalars the launcher derives once per call.
struct FwdArgs {
  int group = 1;           // query heads per kv head
  int m_blocks = 0;        // query blocks per (sequence, head)
  float scale_log2 = 0;    // softmax_scale * log2(e)
};

// Split-KV only (kSplit): split c owns key blocks [c * split_blocks, (c + 1) * split_blocks). A
// parameter of its own, so that the un-split kernel's code stays exactly what it was.
struct FwdSplitArgs {
  int splits = 1;
  int split_blocks = 0;
  PartialOut partial;
};

namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// cp.async of a kRows x kHeadDim tile, zero-filling rows >= rows_valid and chunks >= chunks_valid
// (`fallback` is any valid address: a zero-filling copy reads nothing but still takes one).
template <typename Tr, int kRows>
__device__ __forceinline__ void load_tile(typename Tr::Element* smem_tile, const typename Tr::Element* gmem,
                                          int64_t row_stride, int64_t rows_valid, int chunks_valid,
                                          const void* fallback, int tid) {
  constexpr int kChunks = Tr::kChunks, kThreads = Tr::kThreads;
  if constexpr (kThreads % kChunks == 0) {
    // Each thread keeps one column chunk and walks down the rows: one pointer, one add a copy.
    constexpr int kRowStep = kThreads / kChunks;
    static_assert(kRows % kRowStep == 0, "whole passes over the tile");
    const int row0 = tid / kChunks, chunk = tid % kChunks;
    const bool chunk_ok = chunk < chunks_valid;
    const typename Tr::Element* src = gmem + row0 * row_stride + chunk * 8;
    const uint32_t dst = ptx::smem_addr(smem_tile + row0 * Tr::kRowPitch + chunk * 8);
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const bool valid = chunk_ok && row0 + i * kRowStep < rows_valid;
      ptx::cp_async_16(dst + i * kRowStep * Tr::kRowPitch * sizeof(typename Tr::Element),
                       valid ? static_cast<const void*>(src) : fallback, valid);
      src += kRowStep * row_stride;
    }
  } else {
    constexpr int kPerThread = kRows * kChunks / kThreads;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int row = idx / kChunks;
      const int chunk = idx % kChunks;
      const bool valid = row < rows_valid && chunk < chunks_valid;
      const void* src = valid ? static_cast<const void*>(gmem + row * row_stride + chunk * 8) : fallback;
      ptx::cp_async_16(ptx::smem_addr(smem_tile + row * Tr::kRowPitch + chunk * 8), src, valid);
    }
  }
}

// load_tile for rows that are not one stride apart (a paged KV cache): row r's address comes from
// row_at(r), or nullptr for a row that must read as zeros (outside the cache).
template <typename Tr, int kRows, typename RowAt>
__device__ __forceinline__ void load_tile_rows(typename Tr::Element* smem_tile, RowAt row_at, int64_t rows_valid,
                                               int chunks_valid, const void* fallback, int tid) {
  constexpr int kChunks = Tr::kChunks, kThreads = Tr::kThreads;
  constexpr int kPerThread = (kRows * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = tid + i * kThreads;
    if (idx >= kRows * kChunks) break;
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const typename Tr::Element* base = row < rows_valid && chunk < chunks_valid ? row_at(row) : nullptr;
    const bool valid = base != nullptr;
    const void* src = valid ? static_cast<const void*>(base + chunk * 8) : fallback;
    ptx::cp_async_16(ptx::smem_addr(smem_tile + row * Tr::kRowPitch + chunk * 8), src, valid);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace detail

// kScoreMod: softcap and/or ALiBi present. A separate instantiation keeps their code (tanh,
// per-element distances) out of the plain kernel's loop and register allocation; kSplit likewise
// keeps the split bookkeeping out of the plain kernel.
// kPaged: K/V rows through the page table (a paged KV cache), likewise its own instantiation (a
// run-time switch in the load path cost up to 30% on the H100: bench/results/
// 2026-12-06-h100-session4-df3fd27.md).
template <typename Tr, bool kScoreMod, bool kSplit = false, bool kPaged = false>
__global__ void __launch_bounds__(Tr::kThreads) flash_fwd_kernel(const __grid_constant__ AttnParams p,
                                                                  const FwdArgs args,
                                                                  const __grid_constant__ FwdSplitArgs split_args) {
  using T = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kRowPitch;
  constexpr int kMTiles = Tr::kMTiles, kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;
  const float kNegInf = -__int_as_float(0x7f800000);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // row group and thread-in-group of the MMA fragments

  // Block -> (query block, head, sequence); the heaviest query blocks (most keys under a
  // causal mask) are scheduled first.
  int64_t bid = blockIdx.x;
  const int m_block = args.m_blocks - 1 - int(bid % args.m_blocks);
  bid /= args.m_blocks;
  int split = 0;
  if constexpr (kSplit) {
    split = int(bid % split_args.splits);
    bid /= split_args.splits;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The merge, queued behind as a programmatic dependent, may become resident now; it waits
    // for this grid's partials itself.
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  }
  const int h = int(bid % p.heads);
  const int b = int(bid / p.heads);
  const int hk = h / args.group;

  const int64_t len_q = p.len_q(b);
  const int64_t len_k = p.len_k(b);
  const int64_t m0 = int64_t(m_block) * kBlockM;
  if (m0 >= len_q) return;  // varlen: this sequence is shorter than the longest one
  const int64_t rows = len_q - m0 < kBlockM ? len_q - m0 : kBlockM;  // valid rows of this block
  // The mask in int arithmetic (seqlen_q + seqlen_k < 2^31 on CUDA).
  const Mask32 mask = Mask32::make(len_q, len_k, p.window_left, p.window_right);

  // Keys any row of the block sees (both bounds are monotone in the row).
  const int64_t key_lo = mask.key_begin(int(m0));
  const int64_t key_hi = mask.key_end(int(m0 + rows - 1));
  int n_begin = int(key_lo / kBlockN);
  int n_end = key_hi > key_lo ? int((key_hi + kBlockN - 1) / kBlockN) : n_begin;

  T* out = static_cast<T*>(p.out);
  const int out_chunks = p.head_dim_v / 8;

  if constexpr (kSplit) {  // only this split's key blocks; none: LSE_c = -inf (the merge skips O_c)
    const int split_begin = split * split_args.split_blocks;
    n_begin = n_begin > split_begin ? n_begin : split_begin;
    n_end = n_end < split_begin + split_args.split_blocks ? n_end : split_begin + split_args.split_blocks;
    if (n_end <= n_begin) {
      for (int r = tid; r < rows; r += Tr::kThreads) *split_args.partial.lse_at(split, b, m0 + r, h) = kNegInf;
      return;
    }
  }

  if (n_end <= n_begin) {  // every row of the block is empty: O = 0, LSE = -inf
    for (int idx = tid; idx < rows * out_chunks; idx += Tr::kThreads) {
      const int64_t i = m0 + idx / out_chunks;
      *reinterpret_cast<uint4*>(out + p.out_offset(b, i, h) + (idx % out_chunks) * 8) = make_uint4(0, 0, 0, 0);
    }
    if (p.lse)
      for (int r = tid; r < rows; r += Tr::kThreads) p.lse[p.lse_offset(b, m0 + r, h)] = kNegInf;
    return;
  }

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_k = smem_q + Tr::kSmemQ;        // 2 stages
  T* smem_v = smem_k + 2 * Tr::kSmemKV;   // 2 stages

  const T* gmem_q = static_cast<const T*>(p.q) + p.q_offset(b, m0, h);
  // A KV cache's rows: dense ones one row stride apart from the sequence's first key; paged ones
  // each through the page table (AttnParams::kv_row_offset). Rows outside the cache (trusted
  // device-side indices gone wrong) read as zeros instead of outside memory.
  const bool cache_row_ok = kPaged || p.kv_row_in_cache(b, 0);
  const T* gmem_k = static_cast<const T*>(p.k) + (kPaged || !cache_row_ok ? 0 : p.k_offset(b, 0, hk));
  const T* gmem_v = static_cast<const T*>(p.v) + (kPaged || !cache_row_ok ? 0 : p.v_offset(b, 0, hk));
  const int64_t keys_readable = cache_row_ok ? len_k : 0;
  const int qk_chunks = p.head_dim / 8;

  auto load_k = [&](int n_block, int stage) {
    const int64_t n0 = int64_t(n_block) * kBlockN;
    if constexpr (kPaged) {
      const auto row_at = [&](int r) -> const T* {
        return p.kv_row_in_cache(b, n0 + r) ? static_cast<const T*>(p.k) + p.k_offset(b, n0 + r, hk) : nullptr;
      };
      detail::load_tile_rows<Tr, kBlockN>(smem_k + stage * Tr::kSmemKV, row_at, len_k - n0, qk_chunks, p.k, tid);
      return;
    }
    detail::load_tile<Tr, kBlockN>(smem_k + stage * Tr::kSmemKV, gmem_k + n0 * p.k_stride.row, p.k_stride.row,
                                   keys_readable - n0, qk_chunks, p.k, tid);
  };
  auto load_v = [&](int n_block, int stage) {
    const int64_t n0 = int64_t(n_block) * kBlockN;
    if constexpr (kPaged) {
      const auto row_at = [&](int r) -> const T* {
        return p.kv_row_in_cache(b, n0 + r) ? static_cast<const T*>(p.v) + p.v_offset(b, n0 + r, hk) : nullptr;
      };
      detail::load_tile_rows<Tr, kBlockN>(smem_v + stage * Tr::kSmemKV, row_at, len_k - n0, out_chunks, p.v, tid);
      return;
    }
    detail::load_tile<Tr, kBlockN>(smem_v + stage * Tr::kSmemKV, gmem_v + n0 * p.v_stride.row, p.v_stride.row,
                                   keys_readable - n0, out_chunks, p.v, tid);
  };

  // Prologue: Q and the first K block in one group, the first V block in the next.
  detail::load_tile<Tr, kBlockM>(smem_q, gmem_q, p.q_stride.row, rows, qk_chunks, p.q, tid);
  load_k(n_end - 1, 0);
  ptx::cp_async_commit();
  load_v(n_end - 1, 0);
  ptx::cp_async_commit();

  // Per-thread rows: (m tile mt, half hh) is block row warp_row0 + 16 mt + 8 hh + g, sequence
  // row row0 + 16 mt + 8 hh.
  const int warp_row0 = warp * Tr::kWarpRows;
  const int row0 = int(m0) + warp_row0 + g;
  const ScoreMod mod = kScoreMod ? p.score_mod(b, h) : ScoreMod{};
  constexpr bool has_score_mod = kScoreMod;
  // Without a score modifier (and with a positive scale, so the max of the raw scores is the max
  // of the scaled ones) the scale folds into the exponent: P = exp2(s * scale_log2 - max) is one
  // FFMA per score, and S is never rescaled on its own.
  const bool fold_scale = !has_score_mod && args.scale_log2 > 0;
  const float exp_scale = fold_scale ? args.scale_log2 : 1.0f;

  float acc_o[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // scaled log2 domain; row_sum is this thread's partial
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = kNegInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  // ldmatrix lane addresses (bytes, shared window). Q/A: lanes 0-7 rows 0-7, 8-15 rows 8-15,
  // 16-31 the same at column +8. K/B: lanes 0-15 keys 0-7 (cols +0/+8), 16-31 keys 8-15.
  // V/B^T: lanes 0-7 keys 0-7, 8-15 keys 8-15, 16-31 the same at dim +8.
  const uint32_t q_lane = ptx::smem_addr(smem_q + (warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch +
                                         (lane >> 4) * 8);
  const uint32_t k_lane = ptx::smem_addr(smem_k + ((lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 8);
  const uint32_t v_lane = ptx::smem_addr(smem_v + ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 8);
  constexpr uint32_t kStageBytes = Tr::kSmemKV * sizeof(T);

  int stage = 0;
  for (int n_block = n_end - 1; n_block >= n_begin; --n_block, stage ^= 1) {
    const int64_t n0 = int64_t(n_block) * kBlockN;

    // K of this block (and Q) landed; every warp is done with the other stage.
    ptx::cp_async_wait<1>();
    __syncthreads();
    if (n_block > n_begin) load_k(n_block - 1, stage ^ 1);
    ptx::cp_async_commit();

    // S = Q K^T
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
    const uint32_t k_stage = k_lane + stage * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < Tr::kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ptx::ldmatrix_x4(a[mt], q_lane + (mt * 16 * kPitch + kk * 16) * sizeof(T));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bk[4];
        ptx::ldmatrix_x4(bk, k_stage + (np * 16 * kPitch + kk * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ptx::mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          ptx::mma_16816<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Scores to the log2 domain (unless folded into the exponent), with softcap / ALiBi applied on
    // the natural scale first.
    if (!fold_scale && !has_score_mod) {  // negative scale
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] *= args.scale_log2;
    } else if constexpr (has_score_mod) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = row0 + mt * 16 + (e / 2) * 8, key = int(n0) + nt * 8 + 2 * t + (e & 1);
            s[mt][nt][e] = mod.apply(s[mt][nt][e] * p.scale, row, key, mask) * detail::kLog2e;
          }
    }

    // Keys outside a row's window (or past the sequence) -> -inf. Interior blocks skip this.
    if (!mask.block_fully_visible(int(m0), int(m0 + rows), int(n0), int(n0) + kBlockN)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // Visible keys [begin, end) of this row relative to n0.
          const int row = row0 + mt * 16 + hh * 8;
          const int begin = mask.key_begin(row) - int(n0);
          const int end = mask.key_end(row) - int(n0);
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = nt * 8 + 2 * t + e;
              if (j < begin || j >= end) s[mt][nt][2 * hh + e] = kNegInf;
            }
        }
    }

    // Online softmax: new max, rescale of the running state, P = exp2(S - max).
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
        mx = fmaxf(row_max[mt][hh], detail::quad_max(mx) * exp_scale);  // -inf * exp_scale = -inf
        // A row with no visible key so far keeps max = -inf: subtract 0 instead, so that
        // exp2(-inf - max) is 0 and not NaN.
        const float m_use = mx == kNegInf ? 0.0f : mx;
        const float alpha = ptx::exp2_approx(row_max[mt][hh] - m_use);
        row_max[mt][hh] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
            s[mt][nt][e] = ptx::exp2_approx(fmaf(s[mt][nt][e], exp_scale, -m_use));
            sum += s[mt][nt][e];
          }
        row_sum[mt][hh] = row_sum[mt][hh] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * hh] *= alpha;
          acc_o[mt][dt][2 * hh + 1] *= alpha;
        }
      }

    // V of this block landed; every warp is done reading the other V stage.
    ptx::cp_async_wait<1>();
    __syncthreads();
    if (n_block > n_begin) load_v(n_block - 1, stage ^ 1);
    ptx::cp_async_commit();

    // O += P V, P straight from the S registers.
    const uint32_t v_stage = v_lane + stage * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = ptx::pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = ptx::pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = ptx::pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = ptx::pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, v_stage + (kk * 16 * kPitch + dp * 16) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ptx::mma_16816<T>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          ptx::mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  if constexpr (kSplit) {
    // Split epilogue: O / l and LSE_c in fp32, straight from the registers (the 4 lanes of a row
    // write 32 contiguous bytes per n8 tile).
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float l = detail::quad_sum(row_sum[mt][hh]);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const int r = warp_row0 + mt * 16 + hh * 8 + g;
        if (r >= rows) continue;
        float* dst = split_args.partial.out_at(split, b, m0 + r, h);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          if (dt * 8 < p.head_dim_v)
            *reinterpret_cast<float2*>(dst + dt * 8 + 2 * t) =
                make_float2(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
        if (t == 0)
          *split_args.partial.lse_at(split, b, m0 + r, h) =
              l > 0.0f ? (row_max[mt][hh] + log2f(l)) * detail::kLn2 : kNegInf;
      }
  } else {
    // Epilogue: O / l into this warp's own Q rows of smem (no other warp reads them), LSE out,
    // then 16-byte coalesced stores of the valid rows and columns.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float l = detail::quad_sum(row_sum[mt][hh]);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const int r = warp_row0 + mt * 16 + hh * 8 + g;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          *reinterpret_cast<uint32_t*>(smem_q + r * kPitch + dt * 8 + 2 * t) =
              ptx::pack2<T>(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
        if (t == 0 && r < rows && p.lse)  // null: the caller wants no LSE
          p.lse[p.lse_offset(b, m0 + r, h)] = l > 0.0f ? (row_max[mt][hh] + log2f(l)) * detail::kLn2 : kNegInf;
      }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < Tr::kWarpRows * Tr::kChunks / 32; ++i) {
      const int idx = lane + i * 32;
      const int r = warp_row0 + idx / Tr::kChunks;
      const int chunk = idx % Tr::kChunks;
      if (r < rows && chunk < out_chunks)
        *reinterpret_cast<uint4*>(out + p.out_offset(b, m0 + r, h) + chunk * 8) =
            *reinterpret_cast<const uint4*>(smem_q + r * kPitch + chunk * 8);
    }
  }
}

}  // namespace flashattn::cuda::sm80
