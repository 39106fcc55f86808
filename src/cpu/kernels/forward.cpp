// CPU FlashAttention forward: tiled, online softmax, never more than O(block) memory per thread.
//
// One task = (batch, kv head, block of kBlockM packed rows[, key split]). The rows of a task
// are (query, head) pairs of all query heads that share the kv head (GQA/MQA), query-major:
// packed row r is query r / group of head hk * group + r % group. So K and V are read once per
// group, and decoding (one query, several heads) still fills the rows. The task walks the key
// blocks its rows can see (causal/window blocks outside the band are skipped) and keeps, per
// row, the running max m, running sum l and the unnormalised output acc.
//
// The scores are held transposed, S^T[key][query]: then S^T = K Q^T takes K as it lies in
// memory (no per-block transpose, only Q^T is packed once per task), the row max / row sum /
// exp of the softmax run down columns as plain vector ops, and P V reads P from S^T through
// the GEMM's strided A operand.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/isa.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/split_partials.h"
#include "cpu/kernels/decode.h"
#include "cpu/kernels/tiles.h"
#include "cpu/backend.h"
#include "core/sink.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Per-thread scratch, sized for the largest block of this problem.
struct Workspace {
  std::vector<float> q_t;    // Q^T of the block, scaled: [head_dim][rows_pad]
  std::vector<float> k;      // fp32 copy of a key block when K is not fp32-contiguous: [kBlockN][head_dim]
  std::vector<float> v;      // fp32 copy of a value block, dv padded: [kBlockN][dv_pad]
  std::vector<float> s_t;    // S^T / P^T: [kBlockN][rows_pad]
  std::vector<float> acc;    // unnormalised O: [kBlockM][dv_pad]
  std::vector<float> m, l;   // running max (log2 domain) and sum per row: [rows_pad]
  std::vector<int32_t> key_begin, key_end;  // visible key range per row: [rows_pad]

  Workspace(const AttnParams& p) {
    const int64_t rows_pad = round_up(kBlockM, kLanes);
    const int64_t dv_pad = round_up(p.head_dim_v, kLanes);
    q_t.resize(p.head_dim * rows_pad);
    k.resize(int64_t(kBlockN) * p.head_dim);
    v.resize(kBlockN * dv_pad);
    s_t.resize(kBlockN * rows_pad);
    acc.resize(kBlockM * dv_pad);
    m.resize(rows_pad);
    l.resize(rows_pad);
    key_begin.resize(rows_pad);
    key_end.resize(rows_pad);
  }
};

// One (batch, kv head, block of packed rows) restricted to keys [key_lo, key_hi).
struct Task {
  int b, hk;
  int64_t row0;  // first packed row: query row0 / group of the sequence
  int rows;
  int64_t key_lo, key_hi;
  int group;     // query heads per kv head

  int64_t query(int r) const { return (row0 + r) / group; }
  int head(int r) const { return hk * group + int((row0 + r) % group); }
};

// Scores below this many rows are dot products rather than a GEMM padded to kLanes rows.
constexpr int kDotRows = 4;
// How many key rows ahead the dot-product path fetches.
constexpr int kDecodePrefetchRows = 16;

// Loads Q^T for the task, scaled so that the scores come out in the log2 domain when no score
// modifier needs the natural-scale value first.
void load_q_transposed(const AttnParams& p, const Task& t, float q_scale, int rows_pad, Workspace& ws) {
  float row[256];
  std::fill(ws.q_t.begin(), ws.q_t.begin() + p.head_dim * rows_pad, 0.0f);
  for (int i = 0; i < t.rows; ++i) {
    to_float(static_cast<const char*>(p.q) + dtype_size(p.dtype) * p.q_offset(t.b, t.query(i), t.head(i)),
             p.dtype, p.head_dim, row);
    for (int d = 0; d < p.head_dim; ++d) ws.q_t[d * rows_pad + i] = row[d] * q_scale;
  }
}

// S^T[j][i] for keys [c0, c0 + cols): a GEMM with K as A, or dot products when the block has
// too few query rows for the GEMM to pay for its padding (decoding).
void scores(const AttnParams& p, const Task& t, int64_t c0, int cols, int rows_pad, Workspace& ws) {
  const size_t esize = dtype_size(p.dtype);
  const char* k_base = static_cast<const char*>(p.k) + esize * p.k_offset(t.b, c0, t.hk);
  StridedA k_block{nullptr, 0, 1};
  if (p.dtype == DType::f32 && p.kv_rows_strided()) {
    k_block = {reinterpret_cast<const float*>(k_base), p.k_stride.row, 1};
  } else if (p.kv_rows_strided()) {
    for (int j = 0; j < cols; ++j) {
      prefetch_row(k_base, p.k_stride.row * (j + kPrefetchRows), p.dtype, p.head_dim);
      to_float(k_base + esize * p.k_stride.row * j, p.dtype, p.head_dim, &ws.k[int64_t(j) * p.head_dim]);
    }
    k_block = {ws.k.data(), p.head_dim, 1};
  } else {  // paged: each key row through the page table
    const char* k_all = static_cast<const char*>(p.k);
    for (int j = 0; j < cols; ++j)
      to_float(k_all + esize * p.k_offset(t.b, c0 + j, t.hk), p.dtype, p.head_dim, &ws.k[int64_t(j) * p.head_dim]);
    k_block = {ws.k.data(), p.head_dim, 1};
  }
  if (t.rows > kDotRows) {
    gemm(cols, rows_pad, p.head_dim, k_block, ws.q_t.data(), rows_pad, ws.s_t.data(), rows_pad, false);
    return;
  }
  // Few rows (decoding): one pass over each key row, a dot product per query row.
  float q_rows[kDotRows][256];
  for (int i = 0; i < t.rows; ++i)
    for (int d = 0; d < p.head_dim; ++d) q_rows[i][d] = ws.q_t[d * rows_pad + i];
  const int d_vec = p.head_dim / kLanes * kLanes;
  // Decoding streams each key and value row once: fetch them ahead (the values for the P V
  // product that follows), or every row waits on memory.
  const char* v_base = static_cast<const char*>(p.v) + esize * p.v_offset(t.b, c0, t.hk);
  for (int j = 0; j < cols; ++j) {
    const float* kj = k_block.data + j * k_block.row_stride;
    // Far ahead: a row costs only a few dozen cycles here against a memory latency of hundreds
    // (past the block's end it warms the next block; a prefetch never faults).
    if (p.kv_rows_strided()) {
      if (p.dtype == DType::f32) prefetch_row(kj, k_block.row_stride * kDecodePrefetchRows, DType::f32, p.head_dim);
      prefetch_row(v_base, p.v_stride.row * j, p.dtype, p.head_dim_v);
    }
    float* s = &ws.s_t[int64_t(j) * rows_pad];
    for (int i = 0; i < t.rows; ++i) {
      vfloat acc{};
      for (int d = 0; d < d_vec; d += kLanes) acc += load(kj + d) * load(&q_rows[i][d]);
      float dot = reduce_add(acc);
      for (int d = d_vec; d < p.head_dim; ++d) dot += kj[d] * q_rows[i][d];
      s[i] = dot;
    }
  }
}

// The value block as a row-major fp32 matrix with a kLanes-multiple row length.
const float* value_block(const AttnParams& p, const Task& t, int64_t c0, int cols, int64_t& ldv,
                         Workspace& ws) {
  const size_t esize = dtype_size(p.dtype);
  const char* v_base = static_cast<const char*>(p.v) + esize * p.v_offset(t.b, c0, t.hk);
  if (p.dtype == DType::f32 && p.head_dim_v % kLanes == 0 && p.kv_rows_strided()) {
    ldv = p.v_stride.row;
    return reinterpret_cast<const float*>(v_base);
  }
  ldv = round_up(p.head_dim_v, kLanes);
  for (int j = 0; j < cols; ++j) {
    const char* src = v_base + esize * p.v_stride.row * j;
    if (p.kv_rows_strided())
      prefetch_row(v_base, p.v_stride.row * (j + kPrefetchRows), p.dtype, p.head_dim_v);
    else  // paged: each value row through the page table
      src = static_cast<const char*>(p.v) + esize * p.v_offset(t.b, c0 + j, t.hk);
    float* dst = &ws.v[j * ldv];
    to_float(src, p.dtype, p.head_dim_v, dst);
    std::fill(dst + p.head_dim_v, dst + ldv, 0.0f);
  }
  return ws.v.data();
}

// ScoreMod (softcap, ALiBi; natural-log domain), then the move to the log2 domain. The softcap
// is vectorised over the rows; the ALiBi slope belongs to each row's head, so its bias goes lane
// by lane.
void apply_score_mod(const AttnParams& p, const Task& t, const Mask& mask, int64_t c0, int cols,
                     int rows_pad, Workspace& ws) {
  const ScoreMod softcap = ScoreMod::make(p.softcap, 0.0f);
  for (int j = 0; j < cols; ++j) {
    float* s = &ws.s_t[int64_t(j) * rows_pad];
    for (int i = 0; i < rows_pad; i += kLanes) {
      vfloat x = load(s + i);
      if (softcap.active()) x = softcap.cap(x);
      if (p.alibi_slopes)
        for (int lane = 0; lane < kLanes && i + lane < t.rows; ++lane)
          x[lane] += p.score_mod(t.b, t.head(i + lane)).bias(float(mask.distance(t.query(i + lane), c0 + j)));
      store(s + i, x * kLog2e);
    }
  }
}

// -inf where key c0 + j is outside row i's visible range.
void apply_mask(int64_t c0, int cols, int rows_pad, Workspace& ws) {
  for (int j = 0; j < cols; ++j) {
    float* s = &ws.s_t[int64_t(j) * rows_pad];
    const int32_t key = int32_t(c0 + j);
    for (int i = 0; i < rows_pad; i += kLanes) {
      vint kb, ke;
      std::memcpy(&kb, &ws.key_begin[i], sizeof kb);
      std::memcpy(&ke, &ws.key_end[i], sizeof ke);
      const vint visible = (kb <= key) & (ke > key);
      store(s + i, visible ? load(s + i) : splat(kNegInf));
    }
  }
}

// The online-softmax step for one key block: new running max, P = exp2(S - m) in place,
// running sum, and the rescale of acc by exp2(m_old - m_new).
void online_softmax(int cols, int rows, int rows_pad, int dv_pad, Workspace& ws) {
  for (int i = 0; i < rows_pad; i += kLanes) {
    vfloat mx = splat(kNegInf);
    for (int j = 0; j < cols; ++j) mx = vmax(mx, load(&ws.s_t[int64_t(j) * rows_pad + i]));
    const vfloat m_old = load(&ws.m[i]);
    const vfloat m_new = vmax(m_old, mx);
    // A row that has seen no visible key keeps m = -inf; subtracting 0 instead keeps
    // exp2(-inf - m) = 0 rather than NaN.
    const vfloat m_use = m_new == kNegInf ? vfloat{} : m_new;
    const vfloat alpha = exp2(m_old - m_use);
    vfloat sum{};
    for (int j = 0; j < cols; ++j) {
      float* s = &ws.s_t[int64_t(j) * rows_pad + i];
      const vfloat pj = exp2(load(s) - m_use);
      store(s, pj);
      sum += pj;
    }
    store(&ws.l[i], alpha * load(&ws.l[i]) + sum);
    store(&ws.m[i], m_new);
    for (int lane = 0; lane < kLanes && i + lane < rows; ++lane) {
      if (alpha[lane] == 1.0f) continue;
      float* a = &ws.acc[int64_t(i + lane) * dv_pad];
      for (int d = 0; d < dv_pad; d += kLanes) store(a + d, load(a + d) * alpha[lane]);
    }
  }
}

// Attends the task's rows to its key range; leaves acc, m (log2 domain) and l in ws.
void attend(const AttnParams& p, const Task& t, Workspace& ws) {
  const int rows_pad = int(round_up(t.rows, kLanes));
  const int dv_pad = int(round_up(p.head_dim_v, kLanes));
  const Mask mask = p.mask(t.b);
  const bool has_mod = p.softcap > 0 || p.alibi_slopes != nullptr;

  load_q_transposed(p, t, has_mod ? p.scale : p.scale * kLog2e, rows_pad, ws);
  std::fill(ws.acc.begin(), ws.acc.begin() + int64_t(t.rows) * dv_pad, 0.0f);
  std::fill(ws.m.begin(), ws.m.begin() + rows_pad, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + rows_pad, 0.0f);
  for (int i = 0; i < rows_pad; ++i) {  // padding rows see nothing and are never written
    ws.key_begin[i] = int32_t(i < t.rows ? mask.key_begin(t.query(i)) : 0);
    ws.key_end[i] = int32_t(i < t.rows ? mask.key_end(t.query(i)) : 0);
  }

  // Keys any row of the block sees (bounds are monotone in the query).
  const int64_t first_query = t.query(0), last_query = t.query(t.rows - 1);
  const int64_t lo = std::max(t.key_lo, mask.key_begin(first_query));
  const int64_t hi = std::min(t.key_hi, mask.key_end(last_query));
  for (int64_t c0 = lo; c0 < hi; c0 += kBlockN) {
    const int cols = int(std::min<int64_t>(kBlockN, hi - c0));
    scores(p, t, c0, cols, rows_pad, ws);
    if (has_mod) apply_score_mod(p, t, mask, c0, cols, rows_pad, ws);
    if (!mask.block_fully_visible(first_query, last_query + 1, c0, c0 + cols) || rows_pad != t.rows)
      apply_mask(c0, cols, rows_pad, ws);
    online_softmax(cols, t.rows, rows_pad, dv_pad, ws);
    int64_t ldv = 0;
    const float* v = value_block(p, t, c0, cols, ldv, ws);
    gemm(t.rows, dv_pad, cols, StridedA{ws.s_t.data(), 1, rows_pad}, v, ldv, ws.acc.data(), dv_pad, true);
  }
}

// O = acc / l and LSE = ln(2) * (m + log2(l)); rows that saw no key get 0 and -inf.
void write_output(const AttnParams& p, const Task& t, Workspace& ws) {
  const int dv_pad = int(round_up(p.head_dim_v, kLanes));
  const size_t esize = dtype_size(p.dtype);
  for (int i = 0; i < t.rows; ++i) {
    const float l = ws.l[i];
    float inv = l > 0 ? 1.0f / l : 0.0f;
    float lse = l > 0 ? (ws.m[i] + std::log2(l)) * kLn2 : kNegInf;
    if (p.sinks) {
      const SinkedRow s = add_sink(lse, p.sinks[t.head(i)]);
      inv *= s.out_scale;
      lse = s.lse;
    }
    from_float(&ws.acc[int64_t(i) * dv_pad], inv, p.head_dim_v, p.dtype,
               static_cast<char*>(p.out) + esize * p.out_offset(t.b, t.query(i), t.head(i)));
    if (p.lse) p.lse[p.lse_offset(t.b, t.query(i), t.head(i))] = lse;
  }
}

// Split-KV partial result: fp32 O_c and LSE_c of each row.
void write_partial(const AttnParams& p, const Task& t, int split, SplitPartials& partials, Workspace& ws) {
  const int dv_pad = int(round_up(p.head_dim_v, kLanes));
  for (int i = 0; i < t.rows; ++i) {
    const float l = ws.l[i];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    from_float(&ws.acc[int64_t(i) * dv_pad], inv, p.head_dim_v, DType::f32,
               partials.out(split, t.b, t.query(i), t.head(i)));
    partials.lse(split, t.b, t.query(i), t.head(i)) = l > 0 ? (ws.m[i] + std::log2(l)) * kLn2 : kNegInf;
  }
}

int thread_count(const AttnParams& p) { return p.num_threads > 0 ? p.num_threads : omp_get_max_threads(); }

// Packed-row blocks per (batch, kv head): enough for the longest sequence.
int64_t row_blocks(const AttnParams& p) { return (p.seqlen_q * p.group_size() + kBlockM - 1) / kBlockM; }

// Task number `task` of the (batch, kv head, row block) grid; rows = 0 when past the sequence.
Task task_at(const AttnParams& p, int64_t task, int64_t key_lo, int64_t key_hi_cap) {
  const int64_t blocks = row_blocks(p);
  Task t{};
  t.b = int(task / (int64_t(p.heads_k) * blocks));
  t.hk = int(task / blocks % p.heads_k);
  t.group = p.group_size();
  t.row0 = task % blocks * kBlockM;
  const int64_t packed_rows = p.len_q(t.b) * t.group;
  t.rows = int(std::clamp<int64_t>(packed_rows - t.row0, 0, kBlockM));
  t.key_lo = key_lo;
  t.key_hi = std::min(p.len_k(t.b), key_hi_cap);
  return t;
}

// Plain path: one task per (batch, kv head, row block), all keys.
void forward_blocks(const AttnParams& p, int threads) {
  const int64_t tasks = int64_t(p.batch) * p.heads_k * row_blocks(p);
#pragma omp parallel num_threads(threads)
  {
    Workspace ws(p);
    // Dynamic: causal and varlen tasks differ in cost.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const Task t = task_at(p, task, 0, INT64_MAX);
      if (t.rows == 0) continue;
      attend(p, t, ws);
      write_output(p, t, ws);
    }
  }
}

// Flash-decoding: few query blocks but long keys. Each (task, split) attends a key chunk into
// fp32 partials; merge() combines them.
void forward_split(const AttnParams& p, int threads, int splits) {
  const int64_t chunk = round_up((p.seqlen_k + splits - 1) / splits, kBlockN);
  SplitPartials partials(p, splits);
  const int64_t tasks = int64_t(p.batch) * p.heads_k * row_blocks(p) * splits;
#pragma omp parallel num_threads(threads)
  {
    Workspace ws(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int split = int(task % splits);
      const Task t = task_at(p, task / splits, split * chunk, (split + 1) * chunk);
      if (t.rows == 0) continue;
      attend(p, t, ws);  // an empty key range leaves l = 0: LSE_c = -inf, ignored by merge
      write_partial(p, t, split, partials, ws);
    }
  }
  partials.merge_into(p, threads);
}

// Splits only when the plain tasks cannot fill the threads and each split keeps several key
// blocks (below that, the partial write and merge cost more than the parallelism returns).
int choose_splits(const AttnParams& p, int threads) {
  if (p.num_splits > 0) return int(std::min<int64_t>(p.num_splits, std::max<int64_t>(1, (p.seqlen_k + kBlockN - 1) / kBlockN)));
  const int64_t tasks = int64_t(p.batch) * p.heads_k * row_blocks(p);
  if (tasks == 0 || tasks >= 2 * threads) return 1;
  const int64_t by_threads = (2 * threads + tasks - 1) / tasks;
  const int64_t by_keys = p.seqlen_k / (4 * kBlockN);
  return int(std::max<int64_t>(1, std::min(by_threads, by_keys)));
}

}  // namespace

void forward(const AttnParams& p) {
  if (p.batch == 0 || p.total_q == 0) return;
  const int threads = thread_count(p);
  if (decode_applies(p)) return forward_decode(p, threads);
  const int splits = choose_splits(p, threads);
  if (splits > 1)
    forward_split(p, threads, splits);
  else
    forward_blocks(p, threads);
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
