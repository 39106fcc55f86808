// The CPU side of forward_kvcache: append the new tokens into the cache (rotary applied to the
// keys, in fp32, stored in the cache's dtype), rotate a copy of q the same way, then the usual
// forward over the cache. Runs only after core/validate_kvcache.cpp accepted the whole call.
#include <cstring>
#include <vector>

#include "core/half.h"
#include "core/rotary.h"
#include "cpu/backend.h"

namespace flashattn::cpu {
namespace {

// Rotates row[0, rotary_dim) in place by the angles of table row `pos` (core/rotary.h).
void rotate_row(const KVCacheParams& kp, int64_t pos, float* row) {
  const DType t = kp.attn.dtype;
  for (int i = 0; i < kp.rotary_dim / 2; ++i) {
    const float c = load_as_float(kp.rotary_cos, pos * kp.rotary_cos_row_stride + i, t);
    const float s = load_as_float(kp.rotary_sin, pos * kp.rotary_sin_row_stride + i, t);
    const RotaryPair pair = rotary_pair(i, kp.rotary_dim, kp.rotary_interleaved);
    rotate(row[pair.first], row[pair.second], c, s);
  }
}

void copy_row(const void* src, int64_t src_offset, void* dst, int64_t dst_offset, DType t, int n) {
  const size_t esize = dtype_size(t);
  std::memcpy(static_cast<char*>(dst) + esize * dst_offset, static_cast<const char*>(src) + esize * src_offset,
              esize * size_t(n));
}

void append(const KVCacheParams& kp) {
  const AttnParams& p = kp.attn;
  const int64_t rows = int64_t(p.batch) * kp.seqlen_new;
  const int threads = p.num_threads > 0 ? p.num_threads : 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads != 1 && rows * p.heads_k > 64)
  for (int64_t r = 0; r < rows; ++r) {
    const int b = int(r / kp.seqlen_new);
    const int64_t j = r % kp.seqlen_new;
    const int64_t key = kp.new_key_index(b, j);
    const int64_t pos = kp.cache_seqlens[b] + j;
    float row[256];
    for (int hk = 0; hk < p.heads_k; ++hk) {
      const int64_t src_k = b * kp.k_new_stride.batch + j * kp.k_new_stride.row + hk * kp.k_new_stride.head;
      const int64_t src_v = b * kp.v_new_stride.batch + j * kp.v_new_stride.row + hk * kp.v_new_stride.head;
      if (kp.rotary_dim > 0) {
        for (int d = 0; d < p.head_dim; ++d) row[d] = load_as_float(kp.k_new, src_k + d, p.dtype);
        rotate_row(kp, pos, row);
        const int64_t dst = p.k_offset(b, key, hk);
        for (int d = 0; d < p.head_dim; ++d) store_from_float(const_cast<void*>(p.k), dst + d, p.dtype, row[d]);
      } else {
        copy_row(kp.k_new, src_k, const_cast<void*>(p.k), p.k_offset(b, key, hk), p.dtype, p.head_dim);
      }
      copy_row(kp.v_new, src_v, const_cast<void*>(p.v), p.v_offset(b, key, hk), p.dtype, p.head_dim_v);
    }
  }
}

// q rotated at its positions into `buffer` (dense (batch, seqlen_q, heads, d), q's dtype).
void rotate_q(const KVCacheParams& kp, std::vector<char>& buffer, AttnParams& p) {
  const int64_t rows = int64_t(p.batch) * p.seqlen_q;
  buffer.resize(size_t(rows) * p.heads * p.head_dim * dtype_size(p.dtype));
  void* dst = buffer.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int b = int(r / p.seqlen_q);
    const int64_t i = r % p.seqlen_q;
    const int64_t pos = rotary_query_position(kp.cache_seqlens[b], i, kp.rotary_per_query);
    float row[256];
    for (int h = 0; h < p.heads; ++h) {
      const int64_t src = p.q_offset(b, i, h);
      for (int d = 0; d < p.head_dim; ++d) row[d] = load_as_float(p.q, src + d, p.dtype);
      rotate_row(kp, pos, row);
      const int64_t out = (r * p.heads + h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) store_from_float(dst, out + d, p.dtype, row[d]);
    }
  }
  p.q = dst;
  p.q_stride = Strides{p.seqlen_q * p.heads * p.head_dim, int64_t(p.heads) * p.head_dim, p.head_dim};
}

}  // namespace

void forward_kvcache(const KVCacheParams& kp) {
  if (kp.seqlen_new > 0) append(kp);
  AttnParams p = kp.attn;
  std::vector<char> rotated;
  if (kp.rotary_dim > 0) rotate_q(kp, rotated, p);
  forward(p);
}

}  // namespace flashattn::cpu
