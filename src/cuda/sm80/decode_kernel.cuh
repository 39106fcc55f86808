// Decode forward for sm80+ (mma.sync, ldmatrix, cp.async): few query rows, long keys, so the
// work is streaming K and V from memory once, as fast as HBM allows.
//
//   Packed rows: the group query heads sharing kv head hk and the query rows of a sequence form
//   seqlen_q * group rows (row r = query r / group of head hk * group + r % group, as the CPU
//   forward packs them), so each K/V byte is read once for the whole group. One CTA owns one m16
//   tile of packed rows of one (sequence, kv head) and one key split.
//   Warps split the keys: warp w takes the CTA's 16-key blocks w, w + warps, ... and streams them
//   through its own cp.async ring (only __syncwarp inside the loop, so warps never wait on each
//   other); each keeps its own running max / sum / O for the 16 rows.
//   per key block:  S = Q K^T (16 x 16), mask / softcap / ALiBi, online softmax, O += P V
//   end: the warps' states are combined through smem (rescaled to the common max), then O / l and
//   LSE go to out / lse, or in fp32 to the split's partial slot for the merge kernel.
//
// Semantics come from core/params.h and core/mask.h, as in the main forward kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/params.h"
#include "cuda/common/ptx.h"
#include "cuda/split_kv.h"
#include "cuda/sm80/tile_size.h"

namespace flashattn::cuda::sm80 {

template <int kHeadDim_, typename Element_>
struct DecodeTraits {
  using Element = Element_;
  static constexpr DecodeTile kTile = decode_tile(kHeadDim_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 16;  // packed rows per CTA: one m16 tile
  static constexpr int kBlockN = 16;  // keys per warp step
  static constexpr int kWarps = kTile.warps;
  static constexpr int kStages = kTile.stages;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of O
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  // One extra 16-byte chunk per row: an odd pitch in chunks puts the 8 row addresses of an
  // ldmatrix in 8 different bank groups.
  static constexpr int kRowPitch = kHeadDim + 8;
  static constexpr int kSmemQ = kBlockM * kRowPitch;
  static constexpr int kSmemKV = kBlockN * kRowPitch;           // one K or V block
  static constexpr int kSmemWarp = kStages * 2 * kSmemKV;         // a warp's K/V ring
  static constexpr int kSmemBytes = (kSmemQ + kWarps * kSmemWarp) * int(sizeof(Element));
  // The end combines the warps' fp32 O through smem, over the drained K/V rings.
  static constexpr int kCombinePitch = kHeadDim + 8;  // floats: 2 wavefronts per float2 row store
  static constexpr int kSmemCombineBytes = kWarps * kBlockM * kCombinePitch * 4;
  // A CTA's key unit: the heuristic cuts splits at multiples of it, so every warp gets as many blocks.
  static constexpr int kKeysPerRound = kWarps * kBlockN;
  // 16-byte copies per lane for one K (or V) block.
  static constexpr int kCopies = kBlockN * kChunks / 32;
  // L2 fetch granularity of the K/V copies: a whole 256-byte row (d = 128 bf16) per DRAM access
  // where rows are 256-byte multiples, else 128 bytes (H100, b16 x 128k keys: 2.97 TB/s with the
  // hint, 2.91 without).
  static constexpr int kPrefetchBytes = (kHeadDim * int(sizeof(Element))) % 256 == 0 ? 256 : 128;

  static_assert(kHeadDim % 16 == 0, "head dim tiles are k16 slices of the QK^T product");
  static_assert(kStages >= 2, "a ring needs one block in use and one in flight");
  static_assert((kBlockN * kChunks) % 32 == 0, "K/V blocks are whole 16-byte chunks per lane");
  static_assert(kSmemCombineBytes <= kWarps * kSmemWarp * int(sizeof(Element)),
                "the warps' O must fit over their K/V rings");
  static_assert(kWarps * kBlockM * 2 * 4 <= kSmemQ * int(sizeof(Element)),
                "the warps' row max / sum must fit over the Q tile");
  static_assert(kSmemBytes <= kSmallSmemBytes, "one binary serves sm80 (163 KB per block) and sm90");
};

// Scalars the launcher derives once per call.
struct DecodeArgs {
  int group = 1;           // query heads per kv head
  int row_blocks = 0;      // m16 tiles of packed rows per (sequence, kv head)
  int splits = 1;          // key splits; 1: O and LSE go straight to out / lse
  int64_t chunk = 0;       // keys per split
  float scale_log2 = 0;    // softmax_scale * log2(e)
  PartialOut partial;      // where split results go (splits > 1)
};

namespace decode_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// cp.async of 16 bytes (zero-filled when !valid) that asks L2 to fetch the surrounding 128 or
// 256 bytes from DRAM at once: K/V rows are streamed whole, so the neighbouring sectors are
// always wanted next.
template <int kPrefetchBytes>
__device__ __forceinline__ void cp_async_16_stream(uint32_t smem, const void* gmem, bool valid) {
  static_assert(kPrefetchBytes == 128 || kPrefetchBytes == 256, "the L2 fetch sizes cp.async offers");
  const int src_bytes = valid ? 16 : 0;
  if constexpr (kPrefetchBytes == 256)
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
  else
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}

// Lets the grid queued behind this one on the stream (the split merge, launched as a
// programmatic dependent) become resident now; it waits for this grid's results itself.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace decode_detail

// kScoreMod: softcap and/or ALiBi present (a separate instantiation keeps tanh and the distance
// arithmetic out of the plain kernel).
// kPaged: K/V rows through the page table (a paged KV cache); its own instantiation, so the
// dense kernel's copy loop keeps one stride per row (a run-time switch there cost 30-50% of the
// decode rate on the H100: bench/results/2026-12-06-h100-session4-df3fd27.md).
template <typename Tr, bool kScoreMod, bool kPaged = false>
__global__ void __launch_bounds__(Tr::kThreads) flash_decode_kernel(const __grid_constant__ AttnParams p,
                                                                     const __grid_constant__ DecodeArgs args) {
  using T = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kRowPitch;
  constexpr int kWarps = Tr::kWarps, kStages = Tr::kStages, kDTiles = Tr::kDTiles, kChunks = Tr::kChunks;
  const float kNegInf = -__int_as_float(0x7f800000);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // row group and thread-in-group of the MMA fragments
  if (args.splits > 1) decode_detail::allow_dependent_launch();

  // Block -> (row block, split, kv head, sequence): the row blocks of one split are neighbours,
  // so they read the same K/V at about the same time (L2 hits).
  int64_t bid = blockIdx.x;
  const int rb = int(bid % args.row_blocks);
  bid /= args.row_blocks;
  const int split = int(bid % args.splits);
  bid /= args.splits;
  const int hk = int(bid % p.heads_k);
  const int b = int(bid / p.heads_k);
  const int group = args.group;

  const int64_t len_q = p.len_q(b);
  const int64_t len_k = p.len_k(b);
  const int64_t r0 = int64_t(rb) * kBlockM;
  if (r0 >= len_q * group) return;  // varlen: this sequence has fewer rows than the longest
  const int rows = int(len_q * group - r0 < kBlockM ? len_q * group - r0 : kBlockM);
  const Mask mask = p.mask(b);

  // This split's keys, narrowed to those some row of the tile sees (both mask bounds are monotone
  // in the query row). Blocks are 16-key aligned; chunk is a multiple of 16.
  const int64_t split_lo = int64_t(split) * args.chunk;
  const int64_t split_hi = split_lo + args.chunk < len_k ? split_lo + args.chunk : len_k;
  const int64_t q_first = r0 / group, q_last = (r0 + rows - 1) / group;
  const int64_t key_lo = mask.key_begin(q_first) > split_lo ? mask.key_begin(q_first) : split_lo;
  const int64_t key_hi = mask.key_end(q_last) < split_hi ? mask.key_end(q_last) : split_hi;
  const int64_t nb_begin = key_lo / kBlockN;
  const int64_t nb_end = key_hi > key_lo ? (key_hi + kBlockN - 1) / kBlockN : nb_begin;
  // This warp's blocks: nb_begin + warp + kWarps * n for n < my_blocks.
  const int my_blocks = nb_end - nb_begin > warp ? int((nb_end - nb_begin - warp + kWarps - 1) / kWarps) : 0;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_kv = smem_q + Tr::kSmemQ + warp * Tr::kSmemWarp;  // this warp's ring: stage s = K, V

  // Q tile: packed row r -> (query r / group, head hk * group + r % group); rows past the
  // sequence and columns past head_dim are zero-filled.
  const int qk_chunks = p.head_dim / 8, v_chunks = p.head_dim_v / 8;
  {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = tid; idx < kBlockM * kChunks; idx += Tr::kThreads) {
      const int r = idx / kChunks, chunk = idx % kChunks;
      const int64_t row = r0 + r;
      const bool valid = r < rows && chunk < qk_chunks;
      const void* src = valid ? static_cast<const void*>(q + p.q_offset(b, row / group, hk * group + int(row % group)) + chunk * 8)
                              : p.q;
      ptx::cp_async_16(ptx::smem_addr(smem_q + r * kPitch + chunk * 8), src, valid);
    }
    ptx::cp_async_commit();
  }

  // Block n of this warp into ring stage `stage`: K then V, keys past the sequence zero-filled
  // (a NaN left in V would poison O through P = 0), chunks past the real head dims too.
  // A KV cache's rows: a dense cache steps one row stride per key from the sequence's first key
  // (the copy loops below walk pointers); a paged one (kPaged) looks each key up through the page
  // table (AttnParams::kv_row_offset). Rows outside the cache (trusted device-side indices gone
  // wrong) read as zeros instead of outside memory.
  const bool cache_row_ok = kPaged || p.kv_row_in_cache(b, 0);
  const int64_t keys_readable = cache_row_ok ? len_k : 0;
  const T* gmem_k = static_cast<const T*>(p.k) + (kPaged || !cache_row_ok ? 0 : p.k_offset(b, 0, hk));
  const T* gmem_v = static_cast<const T*>(p.v) + (kPaged || !cache_row_ok ? 0 : p.v_offset(b, 0, hk));
  // Paged: key `key`'s K (V) row, or null outside the cache.
  auto k_row = [&](int64_t key) -> const T* {
    return p.kv_row_in_cache(b, key) ? static_cast<const T*>(p.k) + p.k_offset(b, key, hk) : nullptr;
  };
  auto v_row = [&](int64_t key) -> const T* {
    return p.kv_row_in_cache(b, key) ? static_cast<const T*>(p.v) + p.v_offset(b, key, hk) : nullptr;
  };
  const uint32_t smem_ring = ptx::smem_addr(smem_kv);
  auto load_block = [&](int n, int stage) {
    const int64_t n0 = (nb_begin + warp + int64_t(kWarps) * n) * kBlockN;
    const int64_t rows_left = keys_readable - n0;
    const uint32_t smem_k = smem_ring + stage * 2 * Tr::kSmemKV * sizeof(T);
    const uint32_t smem_v = smem_k + Tr::kSmemKV * sizeof(T);
    if constexpr (32 % kChunks == 0) {
      // Each lane keeps one column chunk and walks down the rows (d = 64 / 128 / 256).
      constexpr int kRowStep = 32 / kChunks;
      const int row0 = lane / kChunks, chunk = lane % kChunks;
      const bool k_chunk_ok = chunk < qk_chunks, v_chunk_ok = chunk < v_chunks;
      const T* k_src = gmem_k + (n0 + row0) * p.k_stride.row + chunk * 8;  // dense
      const T* v_src = gmem_v + (n0 + row0) * p.v_stride.row + chunk * 8;
      const uint32_t dst = (row0 * kPitch + chunk * 8) * sizeof(T);
#pragma unroll
      for (int i = 0; i < Tr::kCopies; ++i) {
        const int r = row0 + i * kRowStep;
        const bool row_ok = r < rows_left;
        if constexpr (kPaged) {
          k_src = row_ok ? k_row(n0 + r) : nullptr;
          v_src = row_ok ? v_row(n0 + r) : nullptr;
          if (k_src) k_src += chunk * 8;
          if (v_src) v_src += chunk * 8;
        }
        const bool k_ok = row_ok && k_chunk_ok && (!kPaged || k_src);
        const bool v_ok = row_ok && v_chunk_ok && (!kPaged || v_src);
        const uint32_t d = dst + i * kRowStep * kPitch * sizeof(T);
        decode_detail::cp_async_16_stream<Tr::kPrefetchBytes>(smem_k + d, k_ok ? static_cast<const void*>(k_src) : p.k, k_ok);
        decode_detail::cp_async_16_stream<Tr::kPrefetchBytes>(smem_v + d, v_ok ? static_cast<const void*>(v_src) : p.v, v_ok);
        if constexpr (!kPaged) {
          k_src += kRowStep * p.k_stride.row;
          v_src += kRowStep * p.v_stride.row;
        }
      }
    } else {
      const T* k_block = gmem_k + n0 * p.k_stride.row;  // dense
      const T* v_block = gmem_v + n0 * p.v_stride.row;
#pragma unroll
      for (int i = 0; i < Tr::kCopies; ++i) {
        const int idx = lane + 32 * i;
        const int r = idx / kChunks, chunk = idx % kChunks;
        const bool row_ok = r < rows_left;
        const T* k_src = nullptr;
        const T* v_src = nullptr;
        if constexpr (kPaged) {
          k_src = row_ok ? k_row(n0 + r) : nullptr;
          v_src = row_ok ? v_row(n0 + r) : nullptr;
        } else {
          k_src = k_block + r * p.k_stride.row;
          v_src = v_block + r * p.v_stride.row;
        }
        const bool k_ok = row_ok && chunk < qk_chunks && (!kPaged || k_src);
        const bool v_ok = row_ok && chunk < v_chunks && (!kPaged || v_src);
        const uint32_t d = (r * kPitch + chunk * 8) * sizeof(T);
        decode_detail::cp_async_16_stream<Tr::kPrefetchBytes>(
            smem_k + d, k_ok ? static_cast<const void*>(k_src + chunk * 8) : p.k, k_ok);
        decode_detail::cp_async_16_stream<Tr::kPrefetchBytes>(
            smem_v + d, v_ok ? static_cast<const void*>(v_src + chunk * 8) : p.v, v_ok);
      }
    }
  };

  // Prologue: the first kStages - 1 blocks in flight (one commit group each, empty past the end).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_blocks) load_block(s, s);
    ptx::cp_async_commit();
  }

  // Per-thread rows: g and g + 8 of the tile. Each has its own query (mask) and head (ALiBi);
  // its visible keys are clipped to the split. Rows past the tile are never stored: they take the
  // tile's whole key range (zero Q rows give finite scores), so they never force the mask.
  int64_t vis_lo[2], vis_hi[2];
  ScoreMod mod[2] = {};
  int64_t query[2] = {0, 0};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = g + 8 * hh;
    const int64_t row = r0 + r;
    const int64_t i = row / group;
    const bool valid = r < rows;
    const int64_t lo = mask.key_begin(i), hi = mask.key_end(i);
    vis_lo[hh] = valid ? (lo > split_lo ? lo : split_lo) : key_lo;
    vis_hi[hh] = valid ? (hi < split_hi ? hi : split_hi) : key_hi;
    query[hh] = i;
    if (kScoreMod && valid) mod[hh] = p.score_mod(b, hk * group + int(row % group));
  }
  // Keys every row of the tile sees (the bounds are monotone in the row): blocks inside need no mask.
  const int64_t all_lo = mask.key_begin(q_last) > split_lo ? mask.key_begin(q_last) : split_lo;
  const int64_t all_hi = mask.key_end(q_first) < split_hi ? mask.key_end(q_first) : split_hi;
  // Without a score modifier (and with a positive scale) the scale folds into the exponent.
  const bool fold_scale = !kScoreMod && args.scale_log2 > 0;
  const float exp_scale = fold_scale ? args.scale_log2 : 1.0f;

  float acc_o[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[dt][e] = 0.0f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.0f, 0.0f};  // log2 domain; row_sum per thread

  // ldmatrix lane addresses, as in the main kernel: Q/A rows (lane & 7) + 8 * bit 3, column +8 for
  // lanes 16-31; K/B keys (lane & 7) + 8 * bit 4, column +8 by bit 3; V/B^T keys (lane & 7) +
  // 8 * bit 3, column +8 for lanes 16-31.
  const uint32_t q_lane = ptx::smem_addr(smem_q + ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 8);
  const uint32_t k_lane = ptx::smem_addr(smem_kv + ((lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 8);
  const uint32_t v_lane =
      ptx::smem_addr(smem_kv + Tr::kSmemKV + ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 8);
  constexpr uint32_t kStageBytes = 2 * Tr::kSmemKV * sizeof(T);

  // Q is the oldest commit group: it has landed once at most kStages - 1 groups are pending; the
  // barrier makes every thread's part of it visible.
  ptx::cp_async_wait<kStages - 1>();
  __syncthreads();

  for (int n = 0; n < my_blocks; ++n) {
    const int stage = n % kStages;
    // Refill the stage the previous step used (all lanes are past it: the __syncwarp below).
    if (n + kStages - 1 < my_blocks) load_block(n + kStages - 1, (n + kStages - 1) % kStages);
    ptx::cp_async_commit();
    ptx::cp_async_wait<kStages - 1>();  // block n has landed (this lane's copies) ...
    __syncwarp();                       // ... and every lane's

    const int64_t n0 = (nb_begin + warp + int64_t(kWarps) * n) * kBlockN;

    // S = Q K^T: two n8 tiles (keys 0-7, 8-15).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
    const uint32_t k_stage = k_lane + stage * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < Tr::kHeadDim / 16; ++kk) {
      uint32_t a[4], bk[4];
      ptx::ldmatrix_x4(a, q_lane + kk * 16 * sizeof(T));
      ptx::ldmatrix_x4(bk, k_stage + kk * 16 * sizeof(T));
      ptx::mma_16816<T>(s[0], a, bk[0], bk[1]);
      ptx::mma_16816<T>(s[1], a, bk[2], bk[3]);
    }

    // To the log2 domain (unless folded into the exponent), softcap / ALiBi first, then the mask:
    // element (nt, e) is row g + 8 * (e / 2), key n0 + 8 * nt + 2 * t + (e & 1).
    if constexpr (kScoreMod) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e / 2;
          s[nt][e] = mod[hh].apply(s[nt][e] * p.scale, query[hh], n0 + nt * 8 + 2 * t + (e & 1), mask) *
                     decode_detail::kLog2e;
        }
    } else if (!fold_scale) {  // a negative scale: the max must be taken of the scaled scores
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= args.scale_log2;
    }
    if (n0 < all_lo || n0 + kBlockN > all_hi) {  // a block some row sees only in part (CTA-uniform)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int lo = int(vis_lo[hh] - n0), hi = int(vis_hi[hh] - n0);  // |.| < 2^31: both in one sequence
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
            const int j = nt * 8 + 2 * t + (e & 1);
            if (j < lo || j >= hi) s[nt][e] = kNegInf;
          }
      }
    }

    // Online softmax for the thread's two rows.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1]));
      mx = fmaxf(row_max[hh], decode_detail::quad_max(mx) * exp_scale);  // -inf * exp_scale = -inf
      // A row with no visible key so far keeps max = -inf: subtract 0 so exp2 gives 0, not NaN.
      const float m_use = mx == kNegInf ? 0.0f : mx;
      const float alpha = ptx::exp2_approx(row_max[hh] - m_use);
      row_max[hh] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
          s[nt][e] = ptx::exp2_approx(fmaf(s[nt][e], exp_scale, -m_use));
          sum += s[nt][e];
        }
      row_sum[hh] = row_sum[hh] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        acc_o[dt][2 * hh] *= alpha;
        acc_o[dt][2 * hh + 1] *= alpha;
      }
    }

    // O += P V: P from the S registers (the C fragments of the two n8 tiles are P's A fragment).
    uint32_t a[4];
    a[0] = ptx::pack2<T>(s[0][0], s[0][1]);
    a[1] = ptx::pack2<T>(s[0][2], s[0][3]);
    a[2] = ptx::pack2<T>(s[1][0], s[1][1]);
    a[3] = ptx::pack2<T>(s[1][2], s[1][3]);
    const uint32_t v_stage = v_lane + stage * kStageBytes;
#pragma unroll
    for (int dp = 0; dp < kDTiles / 2; ++dp) {
      uint32_t bv[4];
      ptx::ldmatrix_x4_trans(bv, v_stage + dp * 16 * sizeof(T));
      ptx::mma_16816<T>(acc_o[2 * dp], a, bv[0], bv[1]);
      ptx::mma_16816<T>(acc_o[2 * dp + 1], a, bv[2], bv[3]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }

  // Combine the warps. Their rings are drained (only empty groups can be pending) and the barrier
  // ends every warp's reads of Q and K/V, so both areas are reused: Q's for each warp's row max /
  // sum, the rings' for each warp's O rescaled to the common max.
  ptx::cp_async_wait<0>();
  __syncthreads();
  float* smem_max = reinterpret_cast<float*>(smem_raw);  // [kWarps][kBlockM]
  float* smem_sum = smem_max + kWarps * kBlockM;          // [kWarps][kBlockM]
  float* smem_o = reinterpret_cast<float*>(smem_q + Tr::kSmemQ);  // [kWarps][kBlockM][kCombinePitch]
  float l_part[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_part[hh] = decode_detail::quad_sum(row_sum[hh]);
    if (t == 0) {
      smem_max[warp * kBlockM + g + 8 * hh] = row_max[hh];
      smem_sum[warp * kBlockM + g + 8 * hh] = l_part[hh];
    }
  }
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = g + 8 * hh;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, smem_max[w * kBlockM + r]);
    const float m_use = m_all == kNegInf ? 0.0f : m_all;
    float l_all = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l_all += smem_sum[w * kBlockM + r] * ptx::exp2_approx(smem_max[w * kBlockM + r] - m_use);
    // This warp's share of the normalised O: exp2(m_w - m) / l.
    const float factor = l_all > 0.0f ? ptx::exp2_approx(row_max[hh] - m_use) / l_all : 0.0f;
    float* dst = smem_o + (warp * kBlockM + r) * Tr::kCombinePitch + 2 * t;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(acc_o[dt][2 * hh] * factor, acc_o[dt][2 * hh + 1] * factor);
  }
  __syncthreads();

  // Sum over the warps, 8 columns per thread and step, and store the valid rows and columns.
  const bool to_partial = args.splits > 1;
  for (int idx = tid; idx < kBlockM * kChunks; idx += Tr::kThreads) {
    const int r = idx / kChunks, chunk = idx % kChunks;
    if (r >= rows || chunk >= v_chunks) continue;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* src = smem_o + (w * kBlockM + r) * Tr::kCombinePitch + chunk * 8;
      const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
      o[0] += lo.x, o[1] += lo.y, o[2] += lo.z, o[3] += lo.w, o[4] += hi.x, o[5] += hi.y, o[6] += hi.z, o[7] += hi.w;
    }
    const int64_t row = r0 + r;
    const int64_t i = row / group;
    const int h = hk * group + int(row % group);
    if (to_partial) {
      float* dst = args.partial.out_at(split, b, i, h) + chunk * 8;
      *reinterpret_cast<float4*>(dst) = make_float4(o[0], o[1], o[2], o[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(o[4], o[5], o[6], o[7]);
    } else {
      uint4 packed;
      packed.x = ptx::pack2<T>(o[0], o[1]);
      packed.y = ptx::pack2<T>(o[2], o[3]);
      packed.z = ptx::pack2<T>(o[4], o[5]);
      packed.w = ptx::pack2<T>(o[6], o[7]);
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + p.out_offset(b, i, h) + chunk * 8) = packed;
    }
  }
  // LSE = ln 2 * (m + log2 l) per row; -inf for a row that saw no key.
  if (tid < rows) {
    const int r = tid;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, smem_max[w * kBlockM + r]);
    const float m_use = m_all == kNegInf ? 0.0f : m_all;
    float l_all = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l_all += smem_sum[w * kBlockM + r] * ptx::exp2_approx(smem_max[w * kBlockM + r] - m_use);
    const float lse = l_all > 0.0f ? (m_all + log2f(l_all)) * decode_detail::kLn2 : kNegInf;
    const int64_t row = r0 + r;
    const int64_t i = row / group;
    const int h = hk * group + int(row % group);
    if (to_partial)
      *args.partial.lse_at(split, b, i, h) = lse;
    else if (p.lse)  // null: the caller wants no LSE
      p.lse[p.lse_offset(b, i, h)] = lse;
  }
}

}  // namespace flashattn::cuda::sm80
