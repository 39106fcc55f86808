// CPU decoding: a few query rows per kv head (one new token, GQA) against long keys.
//
// The tiled forward gives each kv head its own task, and a kv head's keys lie heads_k * head_dim
// elements apart: at d = 128, fp32, 8 kv heads that is one 512-byte read per 4 KiB page, so every
// key row costs a TLB miss and the hardware prefetchers stop at each page. Here a task is
// (sequence, key chunk) for ALL kv heads: each row of K and V is read whole, in address order,
// once. Per block of kBlock keys, for the rows (kv head, query, head in group) of the sequence:
//
//   S[row][j] = q_row . k_j(kv head)        one pass over each key row, a dot product per row
//   softcap, ALiBi, mask -> log2 domain
//   online softmax per row                  (m, l, rescale of acc)
//   acc[row] += P[row][j] * v_j(kv head)    one pass over each value row
//
// Memory per thread: S and acc for heads * seqlen_q rows. The key chunks are split-KV partials
// that merge() combines; a sequence done in one chunk writes its output directly.
#include "cpu/kernels/decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "cpu/kernels/simd.h"
#include "cpu/kernels/split_partials.h"
#include "core/sink.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows per kv head up to which the path pays: each key row then costs at most 8 dot products
// and 8 axpys, still below the memory time of reading it (fp32: 8 flops per byte at 8 rows).
constexpr int kDecodeRows = 8;
// Keys per softmax step: S stays in L1 for up to 64 rows (16 KiB).
constexpr int kBlock = 64;
// Key rows fetched ahead: a row costs ~100 cycles of work here against ~500 of memory latency.
constexpr int kPrefetchAhead = 8;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct Workspace {
  std::vector<float> q;       // scaled query rows: [rows][head_dim]
  std::vector<float> s;       // scores, then P: [rows][kBlock]
  std::vector<float> acc;     // unnormalised O: [rows][dv_pad]
  std::vector<float> m, l;    // running max (log2 domain) and sum per row
  std::vector<float> k_row, v_row;  // fp32 copies of one kv head's key / value row

  Workspace(const AttnParams& p, int64_t max_rows) {
    const int64_t dv_pad = round_up(p.head_dim_v, kLanes);
    q.resize(max_rows * p.head_dim);
    s.resize(max_rows * kBlock);
    acc.resize(max_rows * dv_pad);
    m.resize(max_rows);
    l.resize(max_rows);
    k_row.resize(round_up(p.head_dim, kLanes));
    v_row.resize(dv_pad);
  }
};

// The rows of sequence b: kv head major, then query, then query head within the group (the
// tiled forward's packing, repeated for each kv head).
struct Rows {
  int64_t per_kv_head;  // len_q(b) * group
  int group;
  int64_t query(int64_t row) const { return row % per_kv_head / group; }
  int head(int64_t row) const { return int(row / per_kv_head * group + row % per_kv_head % group); }
  int kv_head(int64_t row) const { return int(row / per_kv_head); }
};

// Attends sequence b's rows to keys [lo, hi); leaves acc, m and l in ws.
void attend(const AttnParams& p, int b, const Rows& rows, int64_t lo, int64_t hi, Workspace& ws) {
  const int64_t n_rows = rows.per_kv_head * p.heads_k;
  const int64_t dv_pad = round_up(p.head_dim_v, kLanes);
  const int d = p.head_dim, dv = p.head_dim_v, d_vec = d / kLanes * kLanes;
  const size_t esize = dtype_size(p.dtype);
  const Mask mask = p.mask(b);
  const bool has_mod = p.softcap > 0 || p.alibi_slopes != nullptr;  // some head has a ScoreMod
  const bool k_direct = p.dtype == DType::f32;
  const bool v_direct = p.dtype == DType::f32 && dv % kLanes == 0;
  const char* k_base = static_cast<const char*>(p.k);
  const char* v_base = static_cast<const char*>(p.v);

  // Q pre-scaled into the log2 domain unless a score modifier needs natural-scale scores.
  const float q_scale = has_mod ? p.scale : p.scale * kLog2e;
  for (int64_t r = 0; r < n_rows; ++r) {
    float* dst = &ws.q[r * d];
    to_float(static_cast<const char*>(p.q) + esize * p.q_offset(b, rows.query(r), rows.head(r)), p.dtype, d, dst);
    for (int i = 0; i < d; ++i) dst[i] *= q_scale;
  }
  std::fill(ws.acc.begin(), ws.acc.begin() + n_rows * dv_pad, 0.0f);
  std::fill(ws.m.begin(), ws.m.begin() + n_rows, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + n_rows, 0.0f);

  // Keys some row sees (the bounds are monotone in the query).
  lo = std::max(lo, mask.key_begin(0));
  hi = std::min(hi, mask.key_end(p.len_q(b) - 1));
  for (int64_t c0 = lo; c0 < hi; c0 += kBlock) {
    const int cols = int(std::min<int64_t>(kBlock, hi - c0));

    // S = Q K^T, one key row (all kv heads) at a time.
    for (int j = 0; j < cols; ++j) {
      for (int hk = 0; hk < p.heads_k; ++hk) {
        // Paged: the row ahead may lie past the sequence, whose page-table entry is not to be read.
        if (p.kv_rows_strided() || c0 + j + kPrefetchAhead < hi)
          prefetch_row(k_base, p.k_offset(b, c0 + j + kPrefetchAhead, hk), p.dtype, d);
        const char* src = k_base + esize * p.k_offset(b, c0 + j, hk);
        const float* kj = reinterpret_cast<const float*>(src);
        if (!k_direct) {
          to_float(src, p.dtype, d, ws.k_row.data());
          kj = ws.k_row.data();
        }
        for (int64_t r = hk * rows.per_kv_head; r < (hk + 1) * rows.per_kv_head; ++r) {
          const float* qr = &ws.q[r * d];
          vfloat acc{};
          for (int i = 0; i < d_vec; i += kLanes) acc += load(kj + i) * load(qr + i);
          float dot = reduce_add(acc);
          for (int i = d_vec; i < d; ++i) dot += kj[i] * qr[i];
          ws.s[r * kBlock + j] = dot;
        }
      }
    }

    // Score modifiers, mask, online softmax: row by row, vectors along the keys.
    for (int64_t r = 0; r < n_rows; ++r) {
      float* s = &ws.s[r * kBlock];
      const int64_t query = rows.query(r);
      if (has_mod) {
        const ScoreMod mod = p.score_mod(b, rows.head(r));
        for (int j = 0; j < cols; ++j) s[j] = mod.apply(s[j], query, c0 + j, mask) * kLog2e;
      }
      const int64_t visible_lo = std::clamp<int64_t>(mask.key_begin(query) - c0, 0, cols);
      const int64_t visible_hi = std::clamp<int64_t>(mask.key_end(query) - c0, visible_lo, cols);
      std::fill(s, s + visible_lo, kNegInf);
      std::fill(s + visible_hi, s + kBlock, kNegInf);  // the block's tail past `cols` too

      vfloat mx = splat(kNegInf);
      for (int j = 0; j < kBlock; j += kLanes) mx = vmax(mx, load(s + j));
      const float m_old = ws.m[r];
      const float m_new = std::max(m_old, reduce_max(mx));
      // A row that has seen no key keeps m = -inf; subtracting 0 keeps exp2(-inf) = 0, not NaN.
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      vfloat sum{};
      for (int j = 0; j < kBlock; j += kLanes) {
        const vfloat pj = exp2(load(s + j) - m_use);
        store(s + j, pj);
        sum += pj;
      }
      const float alpha = std::exp2(m_old - m_use);
      ws.l[r] = alpha * ws.l[r] + reduce_add(sum);
      ws.m[r] = m_new;
      if (alpha != 1.0f) {
        float* a = &ws.acc[r * dv_pad];
        for (int64_t i = 0; i < dv_pad; i += kLanes) store(a + i, load(a + i) * alpha);
      }
    }

    // acc += P V, one value row (all kv heads) at a time.
    for (int j = 0; j < cols; ++j) {
      for (int hk = 0; hk < p.heads_k; ++hk) {
        if (p.kv_rows_strided() || c0 + j + kPrefetchAhead < hi)
          prefetch_row(v_base, p.v_offset(b, c0 + j + kPrefetchAhead, hk), p.dtype, dv);
        const char* src = v_base + esize * p.v_offset(b, c0 + j, hk);
        const float* vj = reinterpret_cast<const float*>(src);
        if (!v_direct) {
          to_float(src, p.dtype, dv, ws.v_row.data());
          std::fill(ws.v_row.begin() + dv, ws.v_row.end(), 0.0f);
          vj = ws.v_row.data();
        }
        for (int64_t r = hk * rows.per_kv_head; r < (hk + 1) * rows.per_kv_head; ++r) {
          const float pj = ws.s[r * kBlock + j];
          if (pj == 0.0f) continue;  // masked
          float* a = &ws.acc[r * dv_pad];
          const vfloat pv = splat(pj);
          for (int64_t i = 0; i < dv_pad; i += kLanes) store(a + i, load(a + i) + pv * load(vj + i));
        }
      }
    }
  }
}

// Key chunks per sequence: enough work items for every thread (twice over, for balance), each
// chunk several blocks long (a partial costs a write and a merge).
int choose_splits(const AttnParams& p, int threads) {
  const int64_t max_by_keys = std::max<int64_t>(1, (p.seqlen_k + kBlock - 1) / kBlock);
  if (p.num_splits > 0) return int(std::min<int64_t>(p.num_splits, max_by_keys));
  const int64_t want = (2 * int64_t(threads) + p.batch - 1) / p.batch;
  return int(std::clamp<int64_t>(std::min(want, p.seqlen_k / (8 * kBlock)), 1, max_by_keys));
}

}  // namespace

bool decode_applies(const AttnParams& p) { return p.seqlen_q * p.group_size() <= kDecodeRows; }

void forward_decode(const AttnParams& p, int threads) {
  const int splits = choose_splits(p, threads);
  const int64_t chunk = round_up((p.seqlen_k + splits - 1) / splits, kBlock);
  const int64_t dv_pad = round_up(p.head_dim_v, kLanes);
  std::vector<SplitPartials> partials;
  if (splits > 1) partials.emplace_back(p, splits);
  const int64_t tasks = int64_t(p.batch) * splits;
#pragma omp parallel num_threads(threads)
  {
    Workspace ws(p, int64_t(p.heads) * p.seqlen_q);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int b = int(task / splits), split = int(task % splits);
      const Rows rows{p.len_q(b) * p.group_size(), p.group_size()};
      const int64_t n_rows = rows.per_kv_head * p.heads_k;
      if (n_rows == 0) continue;
      attend(p, b, rows, split * chunk, std::min(p.len_k(b), (split + 1) * chunk), ws);
      for (int64_t r = 0; r < n_rows; ++r) {
        // O = acc / l, LSE = ln2 (m + log2 l); a row that saw no key: 0 and -inf.
        const float l = ws.l[r];
        float inv = l > 0 ? 1.0f / l : 0.0f;
        float lse = l > 0 ? (ws.m[r] + std::log2(l)) * kLn2 : kNegInf;
        const int64_t query = rows.query(r);
        const int head = rows.head(r);
        if (p.sinks && splits == 1) {  // split partials: merge() adds the sink once
          const SinkedRow s = add_sink(lse, p.sinks[head]);
          inv *= s.out_scale;
          lse = s.lse;
        }
        if (splits > 1) {
          from_float(&ws.acc[r * dv_pad], inv, p.head_dim_v, DType::f32, partials[0].out(split, b, query, head));
          partials[0].lse(split, b, query, head) = lse;
        } else {
          from_float(&ws.acc[r * dv_pad], inv, p.head_dim_v, p.dtype,
                     static_cast<char*>(p.out) + dtype_size(p.dtype) * p.out_offset(b, query, head));
          if (p.lse) p.lse[p.lse_offset(b, query, head)] = lse;
        }
      }
    }
  }
  if (splits > 1) partials[0].merge_into(p, threads);
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
