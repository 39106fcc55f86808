#include "ref/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/half.h"
#include "core/rotary.h"
#include "core/sink.h"
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
    if (row_max == kNegInf) {  // no visible key: zero output, LSE -inf (the sink's logit with one)
      for (int64_t j = 0; j < sk; ++j) srow[j] = 0;
      if (p.sinks) r.lse[i] = p.sinks[h];
      continue;
    }
    double sum = 0;
    for (int64_t j = 0; j < sk; ++j) {
      srow[j] = std::exp(srow[j] - row_max);
      sum += srow[j];
    }
    r.lse[i] = row_max + std::log(sum);
    // A sink joins the denominator without a value (core/sink.h).
    if (p.sinks) r.lse[i] = add_sink_lse(r.lse[i], p.sinks[h]);
    const double norm = std::exp(row_max - r.lse[i]);  // 1 / sum without a sink
    for (int64_t j = 0; j < sk; ++j) srow[j] *= norm;
  }
  return r;
}

ForwardResult forward_params(const AttnParams& p) {
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

// Every element of a strided view in logical row-major order, as double.
std::vector<double> dense_values(const Tensor& t) {
  std::vector<double> out;
  out.reserve(size_t(t.numel()));
  std::vector<int64_t> idx(size_t(t.rank), 0);
  const int64_t n = t.numel();
  for (int64_t e = 0; e < n; ++e) {
    int64_t offset = 0;
    for (int d = 0; d < t.rank; ++d) offset += idx[d] * t.stride[d];
    out.push_back(double(load_as_float(t.data, offset, t.dtype)));
    for (int d = t.rank - 1; d >= 0; --d) {
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

// Elements spanned by a strided view (a private copy covers its whole extent).
int64_t extent(const Tensor& t) {
  int64_t last = 0;
  for (int d = 0; d < t.rank; ++d) last += (t.shape[d] - 1) * t.stride[d];
  return t.numel() == 0 ? 0 : last + 1;
}

// Rotates row[0, rotary_dim) in fp64 by the angles of table row `pos` (core/rotary.h).
void rotate_row(const KVCacheParams& kp, int64_t pos, double* row) {
  for (int i = 0; i < kp.rotary_dim / 2; ++i) {
    const double c = load_as_float(kp.rotary_cos, pos * kp.rotary_cos_row_stride + i, kp.attn.dtype);
    const double s = load_as_float(kp.rotary_sin, pos * kp.rotary_sin_row_stride + i, kp.attn.dtype);
    const RotaryPair pair = rotary_pair(i, kp.rotary_dim, kp.rotary_interleaved);
    rotate(row[pair.first], row[pair.second], c, s);
  }
}

}  // namespace

ForwardResult forward(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options,
                      const VarlenLayout* layout) {
  const AttnParams p = core::check_inputs(q, k, v, options, layout);
  if (p.device.kind != DeviceKind::cpu)
    throw Error("q", "host memory (the reference runs on the CPU)", device_name(p.device));
  return forward_params(p);
}

KVCacheResult forward_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                              const Options& options) {
  if (q.device.kind != DeviceKind::cpu)
    throw Error("q", "host memory (the reference runs on the CPU)", device_name(q.device));
  // Validation needs an output to check; the oracle's is a scratch one.
  const int64_t dv = cache.v_cache.rank == 4 ? cache.v_cache.shape[3] : 0;
  std::vector<char> out_bytes(size_t(std::max<int64_t>(1, q.numel() / std::max<int64_t>(1, q.size(-1)) * dv)) *
                              dtype_size(q.dtype));
  const Tensor out = q.rank == 4 ? Tensor::contiguous(out_bytes.data(), q.dtype, {q.shape[0], q.shape[1], q.shape[2], dv})
                                 : Tensor{};
  KVCacheParams kp = core::check_kvcache(q, k_new, v_new, cache, out, Tensor{}, options);
  AttnParams& p = kp.attn;

  // Private copies of the caches: the append happens there.
  const size_t esize = dtype_size(p.dtype);
  std::vector<char> k_copy(size_t(extent(cache.k_cache)) * esize), v_copy(size_t(extent(cache.v_cache)) * esize);
  std::memcpy(k_copy.data(), cache.k_cache.data, k_copy.size());
  std::memcpy(v_copy.data(), cache.v_cache.data, v_copy.size());
  p.k = k_copy.data();
  p.v = v_copy.data();
  for (int b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < kp.seqlen_new; ++j)
      for (int hk = 0; hk < p.heads_k; ++hk) {
        std::vector<double> row(size_t(p.head_dim));
        const int64_t src = b * kp.k_new_stride.batch + j * kp.k_new_stride.row + hk * kp.k_new_stride.head;
        for (int d = 0; d < p.head_dim; ++d) row[d] = load_as_float(kp.k_new, src + d, p.dtype);
        if (kp.rotary_dim > 0) rotate_row(kp, kp.cache_seqlens[b] + j, row.data());
        const int64_t key = kp.new_key_index(b, j);
        for (int d = 0; d < p.head_dim; ++d) store_from_float(k_copy.data(), p.k_offset(b, key, hk) + d, p.dtype, float(row[d]));
        const int64_t src_v = b * kp.v_new_stride.batch + j * kp.v_new_stride.row + hk * kp.v_new_stride.head;
        for (int d = 0; d < p.head_dim_v; ++d)
          store_from_float(v_copy.data(), p.v_offset(b, key, hk) + d, p.dtype, load_as_float(kp.v_new, src_v + d, p.dtype));
      }

  // q rotated at its positions, stored in its dtype (dense).
  std::vector<char> q_rot;
  if (kp.rotary_dim > 0) {
    q_rot.resize(size_t(p.total_q) * p.heads * p.head_dim * esize);
    for (int b = 0; b < p.batch; ++b)
      for (int64_t i = 0; i < p.seqlen_q; ++i)
        for (int h = 0; h < p.heads; ++h) {
          std::vector<double> row(size_t(p.head_dim));
          for (int d = 0; d < p.head_dim; ++d) row[d] = load_as_float(p.q, p.q_offset(b, i, h) + d, p.dtype);
          rotate_row(kp, rotary_query_position(kp.cache_seqlens[b], i, kp.rotary_per_query), row.data());
          const int64_t dst = ((int64_t(b) * p.seqlen_q + i) * p.heads + h) * p.head_dim;
          for (int d = 0; d < p.head_dim; ++d) store_from_float(q_rot.data(), dst + d, p.dtype, float(row[d]));
        }
    p.q = q_rot.data();
    p.q_stride = Strides{p.seqlen_q * p.heads * p.head_dim, int64_t(p.heads) * p.head_dim, p.head_dim};
  }

  const ForwardResult f = forward_params(p);
  Tensor k_after = cache.k_cache, v_after = cache.v_cache;
  k_after.data = k_copy.data();
  v_after.data = v_copy.data();
  return {f.out, f.lse, dense_values(k_after), dense_values(v_after)};
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
  if (p.sinks) r.dsinks.assign(size_t(p.heads), 0.0);
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
        if (p.sinks) r.dsinks[h] += sink_grad_term(p.sinks[h], pr.lse[i], D);
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
