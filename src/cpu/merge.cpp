// merge(): combines partial attention results over disjoint key sets.
//   LSE = log sum_c exp(LSE_c),  O = sum_c exp(LSE_c - LSE) O_c
// Memory-bound and tiny next to attention itself, so plain loops serve every ISA.
#include <cmath>
#include <limits>

#include "core/half.h"
#include "core/sink.h"
#include "cpu/backend.h"

namespace flashattn::cpu {

void merge(const MergeParams& m) {
  const int64_t rows = int64_t(m.batch) * m.seqlen_q * m.heads;
  const int threads = m.num_threads > 0 ? m.num_threads : 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads != 1 && rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    const int h = int(r % m.heads);
    const int64_t i = (r / m.heads) % m.seqlen_q;
    const int b = int(r / (int64_t(m.heads) * m.seqlen_q));
    if (m.seqused_q && i >= m.seqused_q[b]) continue;  // a row the sequence does not use: not written
    int64_t out_row = i;
    if (m.cu_seqlens_q) {
      if (i >= m.cu_seqlens_q[b + 1] - m.cu_seqlens_q[b]) continue;
      out_row = m.cu_seqlens_q[b] + i;
    }
    auto lse_of = [&](int c) {
      return m.partial_lse[c * m.pl_split_stride + b * m.pl_batch_stride + h * m.pl_head_stride +
                           i * m.pl_row_stride];
    };
    const int64_t out_base = b * m.out_stride.batch + out_row * m.out_stride.row + h * m.out_stride.head;
    // Null when the forward's caller asked for no LSE (the public merge always has one).
    float* lse_out = m.lse ? &m.lse[b * m.lse_batch_stride + h * m.lse_head_stride + out_row * m.lse_row_stride]
                           : nullptr;

    float lse_max = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < m.splits; ++c) lse_max = std::fmax(lse_max, lse_of(c));
    if (lse_max == -std::numeric_limits<float>::infinity()) {  // no split saw a key
      if (lse_out) *lse_out = m.sinks ? add_sink(lse_max, m.sinks[h]).lse : lse_max;
      for (int d = 0; d < m.head_dim_v; ++d) store_from_float(m.out, out_base + d, m.out_dtype, 0.0f);
      continue;
    }
    // Weights relative to the largest LSE, normalised by their sum: exp(LSE_c - LSE) through a
    // rounded LSE would scale every weight by |LSE| * 2^-24.
    float sum = 0;
    for (int c = 0; c < m.splits; ++c) sum += std::exp(lse_of(c) - lse_max);
    float lse = lse_max + std::log(sum);
    float inv_sum = 1.0f / sum;
    if (m.sinks) {  // the sink joins once, after the splits (core/sink.h)
      const SinkedRow s = add_sink(lse, m.sinks[h]);
      inv_sum *= s.out_scale;
      lse = s.lse;
    }
    if (lse_out) *lse_out = lse;
    for (int d = 0; d < m.head_dim_v; ++d) {
      float acc = 0;
      for (int c = 0; c < m.splits; ++c) {
        const float w = std::exp(lse_of(c) - lse_max) * inv_sum;
        if (w == 0) continue;  // also skips the (possibly unwritten) output of an empty split
        acc += w * m.partial_out[c * m.po_split_stride + b * m.po_batch_stride + i * m.po_row_stride +
                                 h * m.po_head_stride + d];
      }
      store_from_float(m.out, out_base + d, m.out_dtype, acc);
    }
  }
}

}  // namespace flashattn::cpu
