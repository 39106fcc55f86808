// CPU FlashAttention backward (FA2 adapted to a CPU): dQ, dK, dV from dO, Q, K, V, O and the
// forward's LSE, never more than O(sequence) memory, all math in fp32.
//
// One work item = (batch b, kv head hk, chunk of key blocks). The item owns dK/dV of its keys
// for kv head hk. It walks the query heads of the GQA group one at a time; per head it packs
// Q, dO (row-major and transposed), D = rowsum(dO * O), LSE (log2 domain) and each row's
// visible key range once, then visits every (key block j, query block i) pair that the
// causal/window mask leaves visible:
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

#include <omp.h>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/isa.h"
#include "cpu/kernels/simd.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Block sizes of the backward pass. Per (key block, query block) pair the working set is
// K_j, V_j, dK_j, dV_j (kBwdBlockN rows each), Q_i, Q_i^T, dO_i, dO_i^T, dQ_i (kBwdBlockM rows
// each) and the two kBwdBlockN x kBwdBlockM score blocks: about 0.6 MiB at d = 128, inside a
// 1 MiB L2. Both are multiples of the GEMM's 6-row micro-tile and of every vector width, so
// no GEMM call ends in a thin edge tile.
#ifndef FA_BWD_BM
#define FA_BWD_BM 128
#endif
#ifndef FA_BWD_BN
#define FA_BWD_BN 120
#endif
constexpr int kBwdBlockM = FA_BWD_BM;  // queries per block
constexpr int kBwdBlockN = FA_BWD_BN;  // keys per block
static_assert(kBwdBlockM % 16 == 0, "kBwdBlockM: query blocks are whole vectors on every ISA");

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// 64-byte aligned, uninitialised fp32/int32 storage: SIMD loads never split cache lines.
template <typename T>
class Buffer {
 public:
  void resize(int64_t n) {
    const size_t bytes = size_t(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!ptr_) throw std::bad_alloc();
  }
  T* data() const { return ptr_.get(); }
  T& operator[](int64_t i) const { return ptr_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
};

// Sizes shared by every item of one call.
struct Geometry {
  int d = 0, dv = 0;          // head dims of q/k and v
  int d_pad = 0, dv_pad = 0;  // rounded to kLanes
  int64_t sq_pad = 0;         // longest query sequence, rounded to kBwdBlockM
  int64_t chunk_len = 0;      // keys per chunk, a multiple of kBwdBlockN
  int chunks = 1;             // key chunks per (batch, kv head)
  // Per query row, computed once before the items: LSE * log2(e) (+inf for rows that saw no
  // key, so that exp2(S - lse2) = 0, not NaN) and D = rowsum(dO * O).
  // [head][row_stride], row = q_row_base(b) + i; padded so that whole vectors can be read.
  const float* lse2 = nullptr;
  const float* delta = nullptr;
  int64_t row_stride = 0;
};

// Per-thread scratch, sized once for the largest item of the call.
struct Workspace {
  Buffer<float> k, v;          // fp32 keys/values of the chunk: [chunk_len][d_pad / dv_pad]
  Buffer<float> dk, dv;        // their gradients, fp32: [chunk_len][d_pad / dv_pad]
  Buffer<float> q, dout;       // one head's rows: [sq_pad][d_pad / dv_pad]
  Buffer<float> q_t, dout_t;   // transposed per query block: [block][d / dv][kBwdBlockM]
  Buffer<float> dq;            // one head's dQ, fp32: [sq_pad][d_pad] (single-chunk calls)
  Buffer<int32_t> key_begin, key_end;  // visible key range per query row: [sq_pad]
  Buffer<float> s, dp;         // S^T -> P^T and dP^T -> dS^T: [kBwdBlockN][kBwdBlockM]

  Workspace(const Geometry& g) {
    k.resize(g.chunk_len * g.d_pad);
    v.resize(g.chunk_len * g.dv_pad);
    dk.resize(g.chunk_len * g.d_pad);
    dv.resize(g.chunk_len * g.dv_pad);
    q.resize(g.sq_pad * g.d_pad);
    dout.resize(g.sq_pad * g.dv_pad);
    q_t.resize(g.sq_pad * g.d);
    dout_t.resize(g.sq_pad * g.dv);
    if (g.chunks == 1) dq.resize(g.sq_pad * g.d_pad);
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

// Software prefetch of one strided tensor row a few rows ahead: rows of a (batch, row, head,
// dim) tensor lie heads * dim elements apart, often a page or more, where the hardware
// prefetchers give up and the packing loops would wait on every row.
void prefetch_row(const void* base, int64_t offset, DType t, int n) {
  const char* p = static_cast<const char*>(base) + dtype_size(t) * offset;
  for (int64_t byte = 0; byte < int64_t(n) * int64_t(dtype_size(t)); byte += 64) __builtin_prefetch(p + byte);
}
constexpr int kPrefetchRows = 4;

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

// Packs Q and dO of query head h, row-major and transposed per query block. Rows past the
// sequence, up to the end of the last query block, are zeros.
void prepare_head(const BwdParams& p, const Geometry& g, int b, int h, Workspace& ws) {
  const int64_t len_q = p.len_q(b);
  const int64_t rows_end = round_up(len_q, kBwdBlockM);
  const ScoreMod mod = p.score_mod(b, h);
  const bool has_mod = mod.softcap > 0 || mod.alibi_slope != 0;
  // Scores come out in the log2 domain directly when no score modifier needs them at the
  // natural scale first (forward.cpp's convention, so P is recomputed the way it was made).
  const float q_scale = has_mod ? p.scale : p.scale * kLog2e;
  for (int64_t i = 0; i < rows_end; ++i) {
    float* q_row = &ws.q[i * g.d_pad];
    float* do_row = &ws.dout[i * g.dv_pad];
    float* q_t = &ws.q_t[i / kBwdBlockM * g.d * kBwdBlockM + i % kBwdBlockM];
    float* do_t = &ws.dout_t[i / kBwdBlockM * g.dv * kBwdBlockM + i % kBwdBlockM];
    if (i >= len_q) {
      std::fill(q_row, q_row + g.d_pad, 0.0f);
      std::fill(do_row, do_row + g.dv_pad, 0.0f);
      for (int d = 0; d < g.d; ++d) q_t[d * kBwdBlockM] = 0.0f;
      for (int d = 0; d < g.dv; ++d) do_t[d * kBwdBlockM] = 0.0f;
      continue;
    }
    if (i + kPrefetchRows < len_q) {
      prefetch_row(p.q, p.q_offset(b, i + kPrefetchRows, h), p.dtype, g.d);
      prefetch_row(p.dout, p.dout_offset(b, i + kPrefetchRows, h), p.dtype, g.dv);
    }
    load_row(p.q, p.q_offset(b, i, h), p.dtype, g.d, g.d_pad, q_row);
    load_row(p.dout, p.dout_offset(b, i, h), p.dtype, g.dv, g.dv_pad, do_row);
    for (int d = 0; d < g.d; ++d) q_t[d * kBwdBlockM] = q_row[d] * q_scale;
    for (int d = 0; d < g.dv; ++d) do_t[d * kBwdBlockM] = do_row[d];
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
        if (mod.softcap > 0) {
          const vfloat t = tanh(x * (1.0f / mod.softcap));
          x = mod.softcap * t;
          ds_scale = scale * (1.0f - t * t);  // d(c tanh(x / c)) / dx
        }
        if (mod.alibi_slope != 0) {
          // |diagonal(i) - key| exactly as ScoreMod (and forward.cpp) form it
          const vint dist = lane_index + int32_t(mask.diagonal(i0 + i) - key);
          const vint abs_dist = dist < 0 ? -dist : dist;
          x -= mod.alibi_slope * __builtin_convertvector(abs_dist, vfloat);
        }
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

  const bool has_mod = mod.softcap > 0 || mod.alibi_slope != 0;
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

// First index in [lo, hi) where pred turns true (pred is monotone: false ... false true ... true).
template <typename Pred>
int64_t first_true(int64_t lo, int64_t hi, Pred pred) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(mid))
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// The item (b, hk, chunk): dK/dV of keys [chunk * chunk_len, ...) of kv head hk, and the dQ
// contribution of those keys to the group's query heads (final dQ when chunks == 1, else
// this chunk's partial).
void process_item(const BwdParams& p, const Geometry& g, int b, int hk, int chunk, float* dq_partial,
                  Workspace& ws) {
  const int group = p.group_size();
  const int64_t len_q = p.len_q(b), len_k = p.len_k(b);
  const int64_t k_lo = chunk * g.chunk_len;
  const int64_t k_hi = std::min(len_k, k_lo + g.chunk_len);
  const int64_t nk = std::max<int64_t>(0, k_hi - k_lo);
  const size_t esize = dtype_size(p.dtype);
  const Mask mask = p.mask(b);

  for (int64_t j = 0; j < nk; ++j) {
    load_row(p.k, p.k_offset(b, k_lo + j, hk), p.dtype, g.d, g.d_pad, &ws.k[j * g.d_pad]);
    load_row(p.v, p.v_offset(b, k_lo + j, hk), p.dtype, g.dv, g.dv_pad, &ws.v[j * g.dv_pad]);
  }
  std::fill(ws.dk.data(), ws.dk.data() + nk * g.d_pad, 0.0f);
  std::fill(ws.dv.data(), ws.dv.data() + nk * g.dv_pad, 0.0f);
  for (int64_t i = 0; i < round_up(len_q, kBwdBlockM); ++i) {  // padding rows see nothing
    ws.key_begin[i] = int32_t(i < len_q ? mask.key_begin(i) : 0);
    ws.key_end[i] = int32_t(i < len_q ? mask.key_end(i) : 0);
  }

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    // dQ of this head: the thread's buffer, or this chunk's slice of the partials.
    float* dq_acc = g.chunks == 1 ? ws.dq.data()
                                  : dq_partial + ((int64_t(chunk) * p.heads + h) * p.total_q + q_row_base(p, b)) * g.d_pad;
    std::fill(dq_acc, dq_acc + len_q * g.d_pad, 0.0f);
    if (nk > 0 && len_q > 0) {
      prepare_head(p, g, b, h, ws);
      const ScoreMod mod = p.score_mod(b, h);
      const float* lse2 = g.lse2 + h * g.row_stride + q_row_base(p, b);
      const float* delta = g.delta + h * g.row_stride + q_row_base(p, b);
      for (int64_t c0 = k_lo; c0 < k_hi; c0 += kBwdBlockN) {
        const int cols = int(std::min<int64_t>(kBwdBlockN, k_hi - c0));
        // Queries that see a key of [c0, c0 + cols): both range bounds are monotone in the row.
        const int64_t i_lo = first_true(0, len_q, [&](int64_t i) { return mask.key_end(i) > c0; });
        const int64_t i_hi = first_true(i_lo, len_q, [&](int64_t i) { return mask.key_begin(i) >= c0 + cols; });
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
    if (g.chunks == 1) {
      for (int64_t i = 0; i < len_q; ++i)
        from_float(&dq_acc[i * g.d_pad], 1.0f, g.d, p.dtype, static_cast<char*>(p.dq) + esize * p.dq_offset(b, i, h));
    }
  }

  // Keys that no query sees (or a sequence without queries) get exact zeros.
  for (int64_t j = 0; j < nk; ++j) {
    from_float(&ws.dk[j * g.d_pad], 1.0f, g.d, p.dtype, static_cast<char*>(p.dk) + esize * p.dk_offset(b, k_lo + j, hk));
    from_float(&ws.dv[j * g.dv_pad], 1.0f, g.dv, p.dtype, static_cast<char*>(p.dv) + esize * p.dv_offset(b, k_lo + j, hk));
  }
}

// Key chunks per (batch, kv head): 1 when there are enough (batch, kv head) items to keep
// every thread busy, else enough chunks for about four items per thread (dynamic scheduling
// evens out causal and varlen imbalance), never more than there are key blocks. A function of
// the problem and the thread count only, so the dQ reduction order is fixed.
int choose_chunks(const BwdParams& p, int threads) {
  const int64_t items = int64_t(p.batch) * p.heads_k;
  const int64_t key_blocks = std::max<int64_t>(1, (p.seqlen_k + kBwdBlockN - 1) / kBwdBlockN);
  if (threads <= 1 || items >= 2 * int64_t(threads)) return 1;
  const int64_t want = (4 * int64_t(threads) + items - 1) / items;
  return int(std::max<int64_t>(1, std::min(want, key_blocks)));
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
  g.chunks = choose_chunks(p, threads);
  g.chunk_len = round_up((p.seqlen_k + g.chunks - 1) / g.chunks, kBwdBlockN);
  if (g.chunk_len > 0) g.chunks = int(std::max<int64_t>(1, (p.seqlen_k + g.chunk_len - 1) / g.chunk_len));
  else g.chunks = 1;

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
    Workspace ws(g);
    // Dynamic: causal, window and varlen items differ in cost.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int chunk = int(item % g.chunks);
      const int hk = int(item / g.chunks % p.heads_k);
      const int b = int(item / g.chunks / p.heads_k);
      process_item(p, g, b, hk, chunk, dq_partial.data(), ws);
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
    float sum[256];
    for (int64_t i = 0; i < p.len_q(b); ++i) {
      const float* part = &dq_partial[(int64_t(h) * p.total_q + q_row_base(p, b) + i) * g.d_pad];
      std::copy(part, part + g.d, sum);
      for (int c = 1; c < g.chunks; ++c)
        for (int d = 0; d < g.d; ++d) sum[d] += part[c * chunk_stride + d];
      from_float(sum, 1.0f, g.d, p.dtype, static_cast<char*>(p.dq) + esize * p.dq_offset(b, i, h));
    }
  }
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
