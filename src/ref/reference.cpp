#include "ref/reference.h"

#include <cmath>
#include <limits>

#include "core/half.h"
#include "core/validate.h"

namespace flashattn::ref {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

bool varlen(const AttnParams& p) { return p.cu_seqlens_q != nullptr; }

// Dense row indices of the results.
int64_t row_q(const AttnParams& p, int b, int64_t i) {
  return varlen(p) ? p.q_begin(b) + i : b * p.seqlen_q + i;
}
int64_t row_k(const AttnParams& p, int b, int64_t j) {
  return varlen(p) ? p.k_begin(b) + j : b * p.seqlen_k + j;
}
int64_t lse_index(const AttnParams& p, int b, int h, int64_t i) {
  return varlen(p) ? h * p.total_q + p.q_begin(b) + i : (int64_t(b) * p.heads + h) * p.seqlen_q + i;
}
int64_t rows_k_total(const AttnParams& p) {
  return varlen(p) ? p.k_begin(p.batch) : int64_t(p.batch) * p.seqlen_k;
}

// S and P of one (batch, head), row-major [len_q][len_k], with the row statistics.
struct Probabilities {
  std::vector<double> dscore;      // d(modified score) / d(scale * q.k): the softcap's derivative
  std::vector<double> p;           // softmax probabilities, 0 where masked
  std::vector<double> lse;         // per row; -inf for a row with no visible key
};

Probabilities probabilities(const AttnParams& p, int b, int h) {
  const int64_t sq = p.len_q(b), sk = p.len_k(b);
  const int hk = h / p.group_size();
  const Mask mask = p.mask(b);
  const ScoreMod mod = p.score_mod(b, h);
  Probabilities r;
  r.dscore.assign(sq * sk, 1.0);
  r.p.assign(sq * sk, 0.0);
  r.lse.assign(sq, kNegInf);
  for (int64_t i = 0; i < sq; ++i) {
    double* srow = r.p.data() + i * sk;  // not &r.p[..]: with no keys p is empty
    double row_max = kNegInf;
    for (int64_t j = 0; j < sk; ++j) {
      double dot = 0;
      for (int d = 0; d < p.head_dim; ++d)
        dot += double(load_as_float(p.q, p.q_offset(b, i, h) + d, p.dtype)) *
               double(load_as_float(p.k, p.k_offset(b, j, hk) + d, p.dtype));
      srow[j] = mask.visible(i, j) ? mod.apply(double(p.scale) * dot, double(mask.distance(i, j)), r.dscore[i * sk + j])
                                   : kNegInf;
      row_max = std::max(row_max, srow[j]);
    }
    if (row_max == kNegInf) {  // no visible key: zero output, LSE -inf
      for (int64_t j = 0; j < sk; ++j) srow[j] = 0;
      continue;
    }
    double sum = 0;
    for (int64_t j = 0; j < sk; ++j) {
      srow[j] = std::exp(srow[j] - row_max);
      sum += srow[j];
    }
    for (int64_t j = 0; j < sk; ++j) srow[j] /= sum;
    r.lse[i] = row_max + std::log(sum);
  }
  return r;
}

}  // namespace

ForwardResult forward(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options,
                      const VarlenLayout* layout) {
  const AttnParams p = core::check_inputs(q, k, v, options, layout);
  if (p.device.kind != DeviceKind::cpu)
    throw Error("q", "host memory (the reference runs on the CPU)", device_name(p.device));
  ForwardResult r;
  r.out.assign(p.total_q * p.heads * p.head_dim_v, 0.0);
  r.lse.assign(p.total_q * p.heads, kNegInf);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      const int hk = h / p.group_size();
      const Probabilities pr = probabilities(p, b, h);
      const int64_t sq = p.len_q(b), sk = p.len_k(b);
      for (int64_t i = 0; i < sq; ++i) {
        r.lse[lse_index(p, b, h, i)] = pr.lse[i];
        double* o = &r.out[(row_q(p, b, i) * p.heads + h) * p.head_dim_v];
        for (int64_t j = 0; j < sk; ++j) {
          const double pij = pr.p[i * sk + j];
          if (pij == 0) continue;
          for (int d = 0; d < p.head_dim_v; ++d)
            o[d] += pij * double(load_as_float(p.v, p.v_offset(b, j, hk) + d, p.dtype));
        }
      }
    }
  }
  return r;
}

BackwardResult backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Options& options, const VarlenLayout* layout) {
  const AttnParams p = core::check_inputs(q, k, v, options, layout);
  if (p.device.kind != DeviceKind::cpu)
    throw Error("q", "host memory (the reference runs on the CPU)", device_name(p.device));
  const bool vl = layout != nullptr;
  const int64_t rows = vl ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  if (!dout.data) throw Error("dout", "a non-null data pointer", "null");
  if (dout.rank != q.rank || dout.dtype != q.dtype || dout.size(-1) != p.head_dim_v ||
      dout.size(-2) != p.heads || dout.stride[dout.rank - 1] != 1)
    throw Error("dout", "the shape of out with the dtype of q and a contiguous last dimension",
                dout.shape_string());
  const Strides ds = vl ? Strides{0, dout.stride[0], dout.stride[1]}
                        : Strides{dout.stride[0], dout.stride[1], dout.stride[2]};
  auto dout_at = [&](int b, int64_t i, int h, int d) {
    return double(load_as_float(dout.data, b * ds.batch + (p.q_begin(b) + i) * ds.row + h * ds.head + d, p.dtype));
  };

  BackwardResult r;
  r.dq.assign(rows * p.heads * p.head_dim, 0.0);
  r.dk.assign(rows_k_total(p) * p.heads_k * p.head_dim, 0.0);
  r.dv.assign(rows_k_total(p) * p.heads_k * p.head_dim_v, 0.0);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      const int hk = h / p.group_size();
      const Probabilities pr = probabilities(p, b, h);
      const int64_t sq = p.len_q(b), sk = p.len_k(b);
      const Mask mask = p.mask(b);
      for (int64_t i = 0; i < sq; ++i) {
        // O_i and D_i = dO_i . O_i in fp64.
        std::vector<double> o(p.head_dim_v, 0.0);
        for (int64_t j = 0; j < sk; ++j)
          for (int d = 0; d < p.head_dim_v; ++d)
            o[d] += pr.p[i * sk + j] * double(load_as_float(p.v, p.v_offset(b, j, hk) + d, p.dtype));
        double D = 0;
        for (int d = 0; d < p.head_dim_v; ++d) D += dout_at(b, i, h, d) * o[d];
        for (int64_t j = 0; j < sk; ++j) {
          const double pij = pr.p[i * sk + j];
          if (pij == 0 || !mask.visible(i, j)) continue;
          double dp = 0;
          for (int d = 0; d < p.head_dim_v; ++d) {
            const double g = dout_at(b, i, h, d);
            dp += g * double(load_as_float(p.v, p.v_offset(b, j, hk) + d, p.dtype));
            r.dv[(row_k(p, b, j) * p.heads_k + hk) * p.head_dim_v + d] += pij * g;
          }
          // d loss / d (modified score), through the score modifier, then raw score = scale * q.k
          const double g = pij * (dp - D) * pr.dscore[i * sk + j] * p.scale;
          for (int d = 0; d < p.head_dim; ++d) {
            r.dq[(row_q(p, b, i) * p.heads + h) * p.head_dim + d] +=
                g * double(load_as_float(p.k, p.k_offset(b, j, hk) + d, p.dtype));
            r.dk[(row_k(p, b, j) * p.heads_k + hk) * p.head_dim + d] +=
                g * double(load_as_float(p.q, p.q_offset(b, i, h) + d, p.dtype));
          }
        }
      }
    }
  }
  return r;
}

}  // namespace flashattn::ref
