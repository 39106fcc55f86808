// CPU FlashAttention backward (FA2 adapted to a CPU): dQ, dK, dV from dO, Q, K, V, O and the
// forward's LSE, never more than O(sequence) memory, all math in fp32.
//
// A pre-pass computes D = rowsum(dO * O) and LSE * log2(e) for every (head, query row). Then
// one work item = (batch b, kv head hk, chunk of key blocks). The item owns dK/dV of its keys
// for kv head hk. It walks the query heads of the GQA group one at a time; per head it packs
// the query rows that can see its keys (Q, dO, row-major and transposed), then visits every
// (key block j, query block i) pair that the causal/window mask leaves visible:
//
//   S^T  = K_j Q_i^T                   (keys x queries, as in forward.cpp: the per-query
//   dP^T = V_j dO_i^T                   vectors LSE and D run along SIMD lanes)
//   P    = exp2(S * log2e - LSE * log2e)   recomputed; masked and LSE = -inf rows give 0
//   dS   = scale * P * (dP - D)        (times 1 - tanh^2 when softcap > 0)
//   dV_j += P^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j
//
// Every product is a call of the register-blocked gemm() of gemm.h: transposed operands are
// read through its strided A, and every B is a packed row-major buffer (a kLanes-multiple row
// length and a short row stride, so a B panel never aliases itself in L1).
//
// dQ without atomics, deterministic: when every (batch, kv head) item covers all key blocks
// (one chunk), the item alone produces dQ of its query heads, accumulated in fp32 and
// converted once. When batch * heads_k is too small to keep the threads busy, the keys are
// split into a fixed number of chunks, chosen from the problem and the thread count only; each
// chunk accumulates its own fp32 partial dQ and the partials are summed afterwards in chunk
// order. Either way each output element is computed by a fixed sequence of fp32 operations,
// independent of the thread that runs an item and of the schedule, so results are
// bitwise-reproducible run to run. The same scheme serves deterministic = false: it is
// already fast, and there is nothing to gain from atomics on a CPU.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <vector>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/isa.h"
#include "cpu/kernels/simd.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Block sizes of the backward pass. Per (key block, query block) pair the working set is
// K_j, V_j, dK_j, dV_j (kBwdBlockN rows each, 240 KiB at d = 128), Q_i, Q_i^T, dO_i, dO_i^T,
// dQ_i (kBwdBlockM rows each, 320 KiB) and the two score blocks (120 KiB): about 0.7 MiB, inside
// a 1 MiB L2. kBwdBlockN, the m of four of the five products, is a multiple of the GEMM's
// 6-row micro-tile (no thin edge tiles); kBwdBlockM, the n of S^T and dP^T, is a multiple of
// the GEMM's widest panel (kGemmNV * 16 = 64 on AVX-512) and of every vector width.
constexpr int kBwdBlockM = 128;  // queries per block
constexpr int kBwdBlockN = 120;  // keys per block
static_assert(kBwdBlockM % 64 == 0, "kBwdBlockM: whole GEMM panels and whole vectors on every ISA");
static_assert(kBwdBlockN % kGemmMR == 0, "kBwdBlockN: whole GEMM micro-tiles");

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// 64-byte aligned, uninitialised fp32/int32 storage: SIMD loads never split cache lines.
constexpr int64_t kHugePage = int64_t(2) << 20;
template <typename T>
class Buffer {
 public:
  void resize(int64_t n) {
    const int64_t bytes = std::max<int64_t>(n, 1) * int64_t(sizeof(T));
    // Large buffers on 2 MiB boundaries, offered to transparent huge pages: the dQ partials and
    // packed rows are touched once per call, where 4 KiB pages cost a fault each.
    const int64_t align = bytes >= kHugePage ? kHugePage : 64;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(size_t(align), size_t(round_up(bytes, align)))));
    if (!ptr_) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) madvise(ptr_.get(), size_t(round_up(bytes, align)), MADV_HUGEPAGE);
#endif
  }
  T* data() const { return ptr_.get(); }
  T& operator[](int64_t i) const { return ptr_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
};

constexpr int kMaxChunks = 64;

// Sizes shared by every item of one call.
struct Geometry {
  int d = 0, dv = 0;          // head dims of q/k and v
  int d_pad = 0, dv_pad = 0;  // rounded to kLanes
  int64_t sq_pad = 0;         // longest query sequence, rounded to kBwdBlockM
  int chunks = 1;             // key chunks per (batch, kv head)
  int64_t chunk_begin[kMaxChunks + 1] = {};  // chunk c: keys [chunk_begin[c], chunk_begin[c + 1])
  int64_t max_chunk_len = 0;  // keys of the longest chunk
  int chunk_order[kMaxChunks] = {};  // chunks by decreasing estimated cost (the run order)
  // Per query row, computed once before the items: LSE * log2(e) (+inf for rows that saw no
  // key, so that exp2(S - lse2) = 0, not NaN) and D = rowsum(dO * O).
  // [head][row_stride], row = q_row_base(b) + i; padded so that whole vectors can be read.
  const float* lse2 = nullptr;
  const float* delta = nullptr;
  int64_t row_stride = 0;
};

// Per-thread scratch, sized once for the largest item of the call.
struct Workspace {
  Buffer<float> k, v;          // fp32 keys/values of the chunk: [max_chunk_len][d_pad / dv_pad]
  Buffer<float> dk, dv;        // their gradients, fp32: [max_chunk_len][d_pad / dv_pad]
  Buffer<float> q, dout;       // one head's rows: [sq_pad][d_pad / dv_pad]
  Buffer<float> q_t, dout_t;   // transposed per query block: [block][d / dv][kBwdBlockM]
  Buffer<float> dq;            // one head's dQ (this chunk's part of it), fp32: [sq_pad][d_pad]
  Buffer<int32_t> key_begin, key_end;  // visible key range per query row: [sq_pad]
  Buffer<float> s, dp;         // S^T -> P^T and dP^T -> dS^T: [kBwdBlockN][kBwdBlockM]

  Workspace(const Geometry& g) {
    k.resize(g.max_chunk_len * g.d_pad);
    v.resize(g.max_chunk_len * g.dv_pad);
    dk.resize(g.max_chunk_len * g.d_pad);
    dv.resize(g.max_chunk_len * g.dv_pad);
    q.resize(g.sq_pad * g.d_pad);
    dout.resize(g.sq_pad * g.dv_pad);
    q_t.resize(g.sq_pad * g.d);
    dout_t.resize(g.sq_pad * g.dv);
    dq.resize(g.sq_pad * g.d_pad);
    key_begin.resize(g.sq_pad);
    key_end.resize(g.sq_pad);
    s.resize(int64_t(kBwdBlockN) * kBwdBlockM);
    dp.resize(int64_t(kBwdBlockN) * kBwdBlockM);
  }
};

// Row r of a [rows][ld] fp32 buffer from one tensor row, zero-padded to ld.
void load_row(const void* base, int64_t offset, DType t, int n, int ld, float* dst) {
  to_float(static_cast<const char*>(base) + dtype_size(t) * offset, t, n, dst);
  std::fill(dst + n, dst + ld, 0.0f);
}


// Row index of (sequence b, row 0) in the dense [total_q] row numbering.
int64_t q_row_base(const BwdParams& p, int b) { return p.cu_seqlens_q ? p.q_begin(b) : int64_t(b) * p.seqlen_q; }

// lse2 and D of every (head, query row), one pass over O and dO before the items.
void row_stats(const BwdParams& p, int threads, int64_t row_stride, float* lse2, float* delta) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int h = 0; h < p.heads; ++h) {
    // Rows of no sequence (and the vector padding) read as "sees nothing".
    std::fill(lse2 + h * row_stride, lse2 + (h + 1) * row_stride, kInf);
    std::fill(delta + h * row_stride, delta + (h + 1) * row_stride, 0.0f);
    float o_row[256], do_row[256];
    for (int b = 0; b < p.batch; ++b) {
      const int64_t len_q = p.len_q(b);
      float* l2 = lse2 + h * row_stride + q_row_base(p, b);
      float* dl = delta + h * row_stride + q_row_base(p, b);
      for (int64_t i = 0; i < len_q; ++i) {
        if (i + kPrefetchRows < len_q) {
          prefetch_row(p.out, p.out_offset(b, i + kPrefetchRows, h), p.dtype, p.head_dim_v);
          prefetch_row(p.dout, p.dout_offset(b, i + kPrefetchRows, h), p.dtype, p.head_dim_v);
        }
        to_float(static_cast<const char*>(p.out) + dtype_size(p.dtype) * p.out_offset(b, i, h), p.dtype,
                 p.head_dim_v, o_row);
        to_float(static_cast<const char*>(p.dout) + dtype_size(p.dtype) * p.dout_offset(b, i, h), p.dtype,
                 p.head_dim_v, do_row);
        float dot = 0.0f;
        for (int d = 0; d < p.head_dim_v; ++d) dot += do_row[d] * o_row[d];
        dl[i] = dot;
        const float lse = p.lse[p.lse_offset(b, i, h)];
        l2[i] = lse == kNegInf ? kInf : lse * kLog2e;
      }
    }
  }
}

// dst[c * dst_ld + l] = src[l * src_ld + c] * scale for l < kLanes, c < n: a kLanes-row
// group of a row-major buffer into columns of a transposed one. Through an L1-resident tile,
// so the transposed side is written a whole vector (one cache line on AVX-512) at a time.
void transpose_rows(const float* src, int64_t src_ld, int n, float scale, float* dst, int64_t dst_ld) {
  alignas(64) float tile[kLanes][kLanes];
  for (int c0 = 0; c0 < n; c0 += kLanes) {
    const int w = std::min(kLanes, n - c0);
    for (int l = 0; l < kLanes; ++l)
      for (int c = 0; c < w; ++c) tile[c][l] = src[l * src_ld + c0 + c];
    for (int c = 0; c < w; ++c) store(dst + (c0 + c) * dst_ld, load(tile[c]) * scale);
  }
}

// Packs rows [rows_begin, rows_end) (whole query blocks) of Q and dO of query head h,
// row-major and transposed per query block. Rows past the sequence are zeros.
void prepare_head(const BwdParams& p, const Geometry& g, int b, int h, int64_t rows_begin, int64_t rows_end,
                  Workspace& ws) {
  const int64_t len_q = p.len_q(b);
  const ScoreMod mod = p.score_mod(b, h);
  const bool has_mod = mod.active();
  // Scores come out in the log2 domain directly when no score modifier needs them at the
  // natural scale first (forward.cpp's convention, so P is recomputed the way it was made).
  const float q_scale = has_mod ? p.scale : p.scale * kLog2e;
  for (int64_t i = rows_begin; i < rows_end; ++i) {
    float* q_row = &ws.q[i * g.d_pad];
    float* do_row = &ws.dout[i * g.dv_pad];
    if (i >= len_q) {
      std::fill(q_row, q_row + g.d_pad, 0.0f);
      std::fill(do_row, do_row + g.dv_pad, 0.0f);
      continue;
    }
    if (i + kPrefetchRows < len_q) {
      prefetch_row(p.q, p.q_offset(b, i + kPrefetchRows, h), p.dtype, g.d);
      prefetch_row(p.dout, p.dout_offset(b, i + kPrefetchRows, h), p.dtype, g.dv);
    }
    load_row(p.q, p.q_offset(b, i, h), p.dtype, g.d, g.d_pad, q_row);
    load_row(p.dout, p.dout_offset(b, i, h), p.dtype, g.dv, g.dv_pad, do_row);
  }
  for (int64_t i = rows_begin; i < rows_end; i += kLanes) {
    const int64_t ib = i / kBwdBlockM, col = i % kBwdBlockM;
    transpose_rows(&ws.q[i * g.d_pad], g.d_pad, g.d, q_scale, &ws.q_t[ib * g.d * kBwdBlockM + col], kBwdBlockM);
    transpose_rows(&ws.dout[i * g.dv_pad], g.dv_pad, g.dv, 1.0f, &ws.dout_t[ib * g.dv * kBwdBlockM + col],
                   kBwdBlockM);
  }
}

// The elementwise middle of a block pair, in place over the two score blocks:
// s: S^T -> P^T, dp: dP^T -> dS^T (scale folded in). kMod: softcap/ALiBi present; kMask: the
// block is not fully visible to all its rows.
template <bool kMod, bool kMask>
void scores_to_grads(const BwdParams& p, const ScoreMod& mod, const Mask& mask, int64_t c0, int cols,
                     int64_t i0, int rows_pad, const float* lse2, const float* delta, Workspace& ws) {
  const vfloat scale = splat(p.scale);
  vint lane_index;
  for (int l = 0; l < kLanes; ++l) lane_index[l] = l;
  for (int j = 0; j < cols; ++j) {
    float* s = &ws.s[int64_t(j) * rows_pad];
    float* dp = &ws.dp[int64_t(j) * rows_pad];
    const int32_t key = int32_t(c0 + j);
    for (int i = 0; i < rows_pad; i += kLanes) {
      vfloat x = load(s + i);
      vfloat ds_scale = scale;
      if constexpr (kMod) {
        // Mask::distance of each lane's (row, key), as a vector.
        const vint dist = lane_index + int32_t(mask.diagonal(i0 + i) - key);
        vfloat dscore;
        x = mod.apply(x, __builtin_convertvector(dist < 0 ? -dist : dist, vfloat), dscore);
        ds_scale = scale * dscore;
        x *= kLog2e;
      }
      vfloat pr = exp2(x - load(lse2 + i));
      if constexpr (kMask) {
        vint kb, ke;
        std::memcpy(&kb, &ws.key_begin[i0 + i], sizeof kb);
        std::memcpy(&ke, &ws.key_end[i0 + i], sizeof ke);
        pr = ((kb <= key) & (ke > key)) ? pr : vfloat{};
      }
      store(s + i, pr);
      store(dp + i, pr * (load(dp + i) - load(delta + i)) * ds_scale);
    }
  }
}

// One (key block, query block) pair of query head h: the five block products.
// Rows [i0, i0 + rows) lie in one query block of the packed grid and i0 is a multiple of
// kLanes, so the transposed operands are column slices of that block's packing. Lanes past
// `rows` are computed but never enter a product (every product stops at `rows`).
void block_pair(const BwdParams& p, const Geometry& g, const Mask& mask, const ScoreMod& mod, int64_t k_lo,
                int64_t c0, int cols, int64_t i0, int rows, const float* lse2, const float* delta, float* dq_acc,
                Workspace& ws) {
  const int rows_pad = int(round_up(rows, kLanes));
  const int64_t ib = i0 / kBwdBlockM;
  const int64_t col = i0 - ib * kBwdBlockM;  // first column within the block's packing
  float* k_j = &ws.k[(c0 - k_lo) * g.d_pad];
  float* v_j = &ws.v[(c0 - k_lo) * g.dv_pad];
  // S^T = K_j Q_i^T and dP^T = V_j dO_i^T
  gemm(cols, rows_pad, g.d, StridedA{k_j, g.d_pad, 1}, &ws.q_t[ib * g.d * kBwdBlockM + col], kBwdBlockM, ws.s.data(),
       rows_pad, false);
  gemm(cols, rows_pad, g.dv, StridedA{v_j, g.dv_pad, 1}, &ws.dout_t[ib * g.dv * kBwdBlockM + col], kBwdBlockM,
       ws.dp.data(), rows_pad, false);

  const bool has_mod = mod.active();
  const bool need_mask = !mask.block_fully_visible(i0, i0 + rows, c0, c0 + cols);
  if (has_mod) {
    if (need_mask)
      scores_to_grads<true, true>(p, mod, mask, c0, cols, i0, rows_pad, lse2 + i0, delta + i0, ws);
    else
      scores_to_grads<true, false>(p, mod, mask, c0, cols, i0, rows_pad, lse2 + i0, delta + i0, ws);
  } else {
    if (need_mask)
      scores_to_grads<false, true>(p, mod, mask, c0, cols, i0, rows_pad, lse2 + i0, delta + i0, ws);
    else
      scores_to_grads<false, false>(p, mod, mask, c0, cols, i0, rows_pad, lse2 + i0, delta + i0, ws);
  }

  // dV_j += P^T dO_i, dK_j += dS^T Q_i (P^T and dS^T are row-major [key][query])
  gemm(cols, g.dv_pad, rows, StridedA{ws.s.data(), rows_pad, 1}, &ws.dout[i0 * g.dv_pad], g.dv_pad,
       &ws.dv[(c0 - k_lo) * g.dv_pad], g.dv_pad, true);
  gemm(cols, g.d_pad, rows, StridedA{ws.dp.data(), rows_pad, 1}, &ws.q[i0 * g.d_pad], g.d_pad,
       &ws.dk[(c0 - k_lo) * g.d_pad], g.d_pad, true);
  // dQ_i += dS K_j: dS read from dS^T through the strided A
  gemm(rows, g.d_pad, cols, StridedA{ws.dp.data(), 1, rows_pad}, k_j, g.d_pad, dq_acc + i0 * g.d_pad, g.d_pad,
       true);
}


// Query rows that see at least one key of [k_lo, k_hi), widened down to a query block
// boundary: the rows an item packs and whose dQ it produces (exact zeros elsewhere). A
// function of (b, chunk) only, so the dQ reduction finds the same ranges.
struct RowRange {
  int64_t begin = 0, end = 0;  // empty when begin >= end
};
RowRange visible_rows(const BwdParams& p, const Geometry& g, int b, int chunk) {
  const int64_t len_q = p.len_q(b);
  const int64_t k_lo = g.chunk_begin[chunk];
  const int64_t k_hi = std::min(p.len_k(b), g.chunk_begin[chunk + 1]);
  if (k_lo >= k_hi || len_q == 0) return {};
  const Mask mask = p.mask(b);
  const auto [lo, hi] = mask.rows_seeing(k_lo, k_hi);
  if (lo >= hi) return {};
  return {lo / kBwdBlockM * kBwdBlockM, hi};
}

// The item (b, hk, chunk): dK/dV of the chunk's keys of kv head hk, and the dQ
// contribution of those keys to the group's query heads (final dQ when chunks == 1, else
// this chunk's partial).
void process_item(const BwdParams& p, const Geometry& g, int b, int hk, int chunk, float* dq_partial,
                  Workspace& ws) {
  const int group = p.group_size();
  const int64_t len_q = p.len_q(b), len_k = p.len_k(b);
  const int64_t k_lo = g.chunk_begin[chunk];
  const int64_t k_hi = std::min(len_k, g.chunk_begin[chunk + 1]);
  const int64_t nk = std::max<int64_t>(0, k_hi - k_lo);
  const size_t esize = dtype_size(p.dtype);
  const Mask mask = p.mask(b);

  for (int64_t j = 0; j < nk; ++j) {
    load_row(p.k, p.k_offset(b, k_lo + j, hk), p.dtype, g.d, g.d_pad, &ws.k[j * g.d_pad]);
    load_row(p.v, p.v_offset(b, k_lo + j, hk), p.dtype, g.dv, g.dv_pad, &ws.v[j * g.dv_pad]);
  }
  std::fill(ws.dk.data(), ws.dk.data() + nk * g.d_pad, 0.0f);
  std::fill(ws.dv.data(), ws.dv.data() + nk * g.dv_pad, 0.0f);
  const RowRange rows = visible_rows(p, g, b, chunk);
  const int64_t rows_end = round_up(rows.end, kBwdBlockM);  // packed to whole query blocks
  for (int64_t i = rows.begin; i < rows_end; ++i) {  // padding rows see nothing
    ws.key_begin[i] = int32_t(i < len_q ? mask.key_begin(i) : 0);
    ws.key_end[i] = int32_t(i < len_q ? mask.key_end(i) : 0);
  }

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    // dQ of this head accumulates in the thread's buffer, which stays in cache from head to head.
    float* dq_acc = ws.dq.data();
    if (rows.begin < rows.end) {
      std::fill(dq_acc + rows.begin * g.d_pad, dq_acc + rows.end * g.d_pad, 0.0f);
      prepare_head(p, g, b, h, rows.begin, rows_end, ws);
      const ScoreMod mod = p.score_mod(b, h);
      const float* lse2 = g.lse2 + h * g.row_stride + q_row_base(p, b);
      const float* delta = g.delta + h * g.row_stride + q_row_base(p, b);
      for (int64_t c0 = k_lo; c0 < k_hi; c0 += kBwdBlockN) {
        const int cols = int(std::min<int64_t>(kBwdBlockN, k_hi - c0));
        // Queries that see a key of [c0, c0 + cols).
        const auto [i_lo, i_hi] = mask.rows_seeing(c0, c0 + cols, rows.begin, rows.end);
        if (i_lo >= i_hi) continue;
        // Query blocks on the packed grid, trimmed to the visible rows (at vector granularity
        // at the start) so causal/window edges do not pay for whole invisible blocks.
        for (int64_t i0 = i_lo / kBwdBlockM * kBwdBlockM; i0 < i_hi; i0 += kBwdBlockM) {
          const int64_t r0 = std::max(i0, i_lo / kLanes * kLanes);
          const int64_t r1 = std::min(i0 + kBwdBlockM, i_hi);
          block_pair(p, g, mask, mod, k_lo, c0, cols, r0, int(r1 - r0), lse2, delta, dq_acc, ws);
        }
      }
    }
    if (g.chunks > 1) {  // this chunk's partial: the rows it produced, once
      float* part = dq_partial + ((int64_t(chunk) * p.heads + h) * p.total_q + q_row_base(p, b)) * g.d_pad;
      std::copy(dq_acc + rows.begin * g.d_pad, dq_acc + rows.end * g.d_pad, part + rows.begin * g.d_pad);
    } else {  // rows that see no key get exact zeros
      static const float zeros[256] = {};
      for (int64_t i = 0; i < len_q; ++i)
        from_float(i >= rows.begin && i < rows.end ? &dq_acc[i * g.d_pad] : zeros, 1.0f, g.d, p.dtype,
                   static_cast<char*>(p.dq) + esize * p.dq_offset(b, i, h));
    }
  }

  // Keys that no query sees (or a sequence without queries) get exact zeros.
  for (int64_t j = 0; j < nk; ++j) {
    from_float(&ws.dk[j * g.d_pad], 1.0f, g.d, p.dtype, static_cast<char*>(p.dk) + esize * p.dk_offset(b, k_lo + j, hk));
    from_float(&ws.dv[j * g.dv_pad], 1.0f, g.dv, p.dtype, static_cast<char*>(p.dv) + esize * p.dv_offset(b, k_lo + j, hk));
  }
}

// Key chunks per (batch, kv head): 1 when there are enough (batch, kv head) items to keep
// every thread busy, else about two items per thread (split_keys balances their cost, dynamic
// scheduling absorbs the rest), never more than there are key blocks. Every chunk costs a
// repacking of Q and dO and a partial dQ, so fewer is better once the threads are fed.
// A function of the problem and the thread count only, so the dQ reduction order is fixed.
int choose_chunks(const BwdParams& p, int threads) {
  const int64_t items = int64_t(p.batch) * p.heads_k;
  const int64_t key_blocks = std::max<int64_t>(1, (p.seqlen_k + kBwdBlockN - 1) / kBwdBlockN);
  if (threads <= 1 || items >= 2 * int64_t(threads)) return 1;
  const int64_t want = (2 * int64_t(threads) + items - 1) / items;
  return int(std::max<int64_t>(1, std::min({want, key_blocks, int64_t(kMaxChunks)})));
}

// Chunk boundaries on the key-block grid, placed so that the chunks hold about equal work:
// the visible (query, key) pairs of a full-length sequence under the mask, plus a little per
// block for the fixed costs. Causal chunks near the start see many more queries than those
// near the end, so equal key counts would leave threads idle.
void split_keys(const BwdParams& p, int chunks, Geometry& g) {
  const int64_t blocks = (p.seqlen_k + kBwdBlockN - 1) / kBwdBlockN;
  g.chunks = int(std::max<int64_t>(1, std::min<int64_t>({chunks, blocks, kMaxChunks})));
  g.chunk_begin[0] = 0;
  std::vector<double> cost;  // per key block
  if (g.chunks > 1) {
    const Mask mask = Mask::make(p.seqlen_q, p.seqlen_k, p.window_left, p.window_right);
    cost.resize(blocks);
    double total = 0;
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t c0 = kb * kBwdBlockN, c1 = std::min(c0 + kBwdBlockN, p.seqlen_k);
      const auto [lo, hi] = mask.rows_seeing(c0, c1);
      cost[kb] = double(std::max<int64_t>(0, hi - lo) + kLanes) * double(c1 - c0);
      total += cost[kb];
    }
    // Chunk c + 1 starts at the first block whose midpoint lies past c + 1 shares of the total
    // (or where each remaining chunk can still get one block).
    int c = 0;
    double acc = 0;
    for (int64_t kb = 1; kb < blocks && c < g.chunks - 1; ++kb) {
      acc += cost[kb - 1];
      const int64_t blocks_left = blocks - kb;
      const int cuts_left = g.chunks - 1 - c;
      if ((acc + 0.5 * cost[kb]) * g.chunks >= total * (c + 1) || blocks_left == cuts_left)
        g.chunk_begin[++c] = kb * kBwdBlockN;
    }
  }
  g.chunk_begin[g.chunks] = p.seqlen_k;
  g.max_chunk_len = 0;
  for (int c = 0; c < g.chunks; ++c)
    g.max_chunk_len = std::max(g.max_chunk_len, g.chunk_begin[c + 1] - g.chunk_begin[c]);
  // Longest first: the dynamic schedule then ends with the short chunks filling the gaps.
  double chunk_cost[kMaxChunks] = {};
  for (int c = 0; c < g.chunks; ++c) {
    g.chunk_order[c] = c;
    for (int64_t kb = g.chunk_begin[c] / kBwdBlockN; kb * kBwdBlockN < g.chunk_begin[c + 1]; ++kb)
      chunk_cost[c] += cost.empty() ? 1.0 : cost[kb];
  }
  std::stable_sort(g.chunk_order, g.chunk_order + g.chunks,
                   [&](int a, int b) { return chunk_cost[a] > chunk_cost[b]; });
}

}  // namespace

void backward(const BwdParams& p) {
  if (p.batch == 0) return;
  const int threads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();

  Geometry g;
  g.d = p.head_dim;
  g.dv = p.head_dim_v;
  g.d_pad = int(round_up(g.d, kLanes));
  g.dv_pad = int(round_up(g.dv, kLanes));
  g.sq_pad = round_up(p.seqlen_q, kBwdBlockM);
  split_keys(p, choose_chunks(p, threads), g);

  Buffer<float> lse2, delta;
  g.row_stride = p.total_q + kBwdBlockM;
  lse2.resize(p.heads * g.row_stride);
  delta.resize(p.heads * g.row_stride);
  row_stats(p, threads, g.row_stride, lse2.data(), delta.data());
  g.lse2 = lse2.data();
  g.delta = delta.data();

  // Partial dQ, [chunk][head][total_q][d_pad] fp32, only when the keys are split.
  Buffer<float> dq_partial;
  if (g.chunks > 1) dq_partial.resize(int64_t(g.chunks) * p.heads * p.total_q * g.d_pad);

  const int64_t items = int64_t(p.batch) * p.heads_k * g.chunks;
#pragma omp parallel num_threads(threads)
  {
    std::optional<Workspace> ws;  // allocated by threads that get an item
    // Dynamic: causal, window and varlen items differ in cost.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      if (!ws) ws.emplace(g);
      // Chunk-rank major: every (batch, kv head) of the costliest chunk first.
      const int chunk = g.chunk_order[item / (int64_t(p.batch) * p.heads_k)];
      const int hk = int(item % p.heads_k);
      const int b = int(item / p.heads_k % p.batch);
      process_item(p, g, b, hk, chunk, dq_partial.data(), *ws);
    }
  }
  if (g.chunks == 1) return;

  // dQ = sum of the chunks' partials, always in chunk order 0, 1, ...: bitwise-reproducible.
  const int64_t rows_tasks = int64_t(p.batch) * p.heads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < rows_tasks; ++task) {
    const int b = int(task / p.heads);
    const int h = int(task % p.heads);
    const size_t esize = dtype_size(p.dtype);
    const int64_t chunk_stride = int64_t(p.heads) * p.total_q * g.d_pad;
    RowRange ranges[kMaxChunks];
    for (int c = 0; c < g.chunks; ++c) ranges[c] = visible_rows(p, g, b, c);
    float sum[256];
    for (int64_t i = 0; i < p.len_q(b); ++i) {
      const float* part = &dq_partial[(int64_t(h) * p.total_q + q_row_base(p, b) + i) * g.d_pad];
      std::fill(sum, sum + g.d, 0.0f);
      for (int c = 0; c < g.chunks; ++c) {  // only the chunks whose keys this row sees
        if (i < ranges[c].begin || i >= ranges[c].end) continue;
        for (int d = 0; d < g.d; ++d) sum[d] += part[c * chunk_stride + d];
      }
      from_float(sum, 1.0f, g.d, p.dtype, static_cast<char*>(p.dq) + esize * p.dq_offset(b, i, h));
    }
  }
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
