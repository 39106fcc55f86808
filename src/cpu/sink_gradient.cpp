// The attention sinks' gradient on the CPU (core/sink.h): per head, a fixed-order fp64 sum over
// every (sequence, row), so the result is the same run to run.
#include <vector>

#include "core/half.h"
#include "core/sink.h"
#include "cpu/backend.h"

namespace flashattn::cpu {

void sink_gradient(const SinkGradParams& p) {
  const int threads = p.num_threads > 0 ? p.num_threads : 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads != 1 && p.heads > 1)
  for (int h = 0; h < p.heads; ++h) {
    double grad = 0;
    for (int b = 0; b < p.batch; ++b)
      for (int64_t i = 0; i < p.len_q(b); ++i) {
        double dot = 0;  // D = rowsum(dout * out)
        const int64_t o = p.out_offset(b, i, h), g = p.dout_offset(b, i, h);
        for (int d = 0; d < p.head_dim_v; ++d)
          dot += double(load_as_float(p.dout, g + d, p.dtype)) * double(load_as_float(p.out, o + d, p.dtype));
        grad += sink_grad_term(p.sinks[h], p.lse[p.lse_offset(b, i, h)], dot);
      }
    p.dsinks[h] = float(grad);
  }
}

}  // namespace flashattn::cpu
