// Online softmax on a wgmma accumulator fragment, in registers.
//
// A thread holds two rows of the warpgroup's 64 (g and g + 8 of its warp's 16, lane = 4g + t):
// element acc_at(i, hh, e) of a fragment is row g + 8hh, column 8i + 2t + e (fragment.h). The four
// threads of a row (t = 0..3) combine their maxima with two shuffles; the row sums stay per-thread
// partials until the epilogue.
//
// Scores live in the log2 domain with the softmax scale folded into the exponent:
//   P = exp2(S * scale_log2 - m),  m = running max of S * scale_log2  (scale_log2 > 0)
// (lazily: m may trail the true max by up to kRescaleSlack, see OnlineSoftmax::step)
// A row with no visible key so far keeps m = -inf; it subtracts 0 instead, so that
// exp2(-inf - m) is 0 and not NaN.
#pragma once

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/sm90/fragment.h"
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/gemms.cuh"

namespace flashattn::cuda::sm90 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Keys outside row (row0 + 8hh)'s visible range -> -inf. key0: the block's first key; t: the
// thread's column pair. Only blocks that cut some row's range call it.
template <int kBlockN>
__device__ __forceinline__ void mask_scores(float (&s)[kBlockN / 2], const FwdParams& p, int row0, int key0, int t) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int begin = p.mask.key_begin(row0 + 8 * hh) - key0;
    const int end = p.mask.key_end(row0 + 8 * hh) - key0;
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * i + 2 * t + e;
        if (j < begin || j >= end) s[acc_at(i, hh, e)] = neg_inf();
      }
  }
}

// Softcap / ALiBi: S -> mod(scale * S) in the natural-log domain (the softmax then scales by log2 e).
// Masked entries are overwritten by mask_scores afterwards.
template <int kBlockN>
__device__ __forceinline__ void modify_scores(float (&s)[kBlockN / 2], const FwdParams& p, const ScoreMod& mod,
                                              int row0, int key0, int t) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[acc_at(i, hh, e)];
        x = mod.apply(x * p.scale, row0 + 8 * hh, key0 + 8 * i + 2 * t + e, p.mask);
      }
}

// Lazy rescaling (kLazy): how far (log2 units) a block's max may exceed the running max before O
// and l are rescaled. Used where O is large (head dim >= 128: 64+ registers of O per thread to
// rescale): +0-12% at d128 / d256 on the H100; at d64 it measured within noise and stays eager
// (bench/gpu/HOPPER_NOTES.md, session 3).
constexpr float kRescaleSlack = 8.0f;

template <int kBlockN, bool kLazy>
struct OnlineSoftmax {
  float row_max[2];  // scaled log2 domain
  float row_sum[2];  // this thread's partial sum of P

  __device__ void init() {
    row_max[0] = row_max[1] = neg_inf();
    row_sum[0] = row_sum[1] = 0.0f;
  }

  // S -> P in place (fp32); returns in alpha the factor that rescales the old O and row sums.
  __device__ __forceinline__ void step(float (&s)[kBlockN / 2], float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = neg_inf();
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) mx = fmaxf(mx, fmaxf(s[acc_at(i, hh)], s[acc_at(i, hh, 1)]));
      mx = quad_max(mx) * scale_log2;  // -inf * scale = -inf
      // Lazy: keep the running max unless the block raises it by more than kRescaleSlack. Then
      // P <= 2^kRescaleSlack (bf16 and fp32 hold it with the same relative precision) and O, l
      // need no rescale (alpha = 1), which is what most blocks after the first see. O / l and
      // LSE = m + log2 l use the same m, so the result does not change. Eager: slack 0.
      if (mx > row_max[hh] + (kLazy ? kRescaleSlack : 0.0f)) {  // also the first block: row_max = -inf
        alpha[hh] = ptx::exp2_approx(row_max[hh] - mx);
        row_max[hh] = mx;
      } else {
        alpha[hh] = 1.0f;
      }
      const float m_use = row_max[hh] == neg_inf() ? 0.0f : row_max[hh];
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[acc_at(i, hh, e)];
          x = ptx::exp2_approx(fmaf(x, scale_log2, -m_use));
          sum += x;
        }
      row_sum[hh] = row_sum[hh] * alpha[hh] + sum;
    }
  }
};

// O *= alpha, row by row.
template <int kHeadDim, bool kLazy>
__device__ __forceinline__ void rescale_o(float (&o)[kHeadDim / 2], const float (&alpha)[2]) {
  // Lazy rescaling (OnlineSoftmax::step) leaves alpha = 1 on most blocks: skip when the whole warp has.
  if constexpr (kLazy)
    if (__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) return;
#pragma unroll
  for (int i = 0; i < kHeadDim / 8; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      o[acc_at(i, hh)] *= alpha[hh];
      o[acc_at(i, hh, 1)] *= alpha[hh];
    }
}

// P (fp32 accumulator layout) -> 16-bit A fragments: k16 step kk covers n8 tiles 2kk and 2kk + 1,
// whose C layout is exactly the A layout of rows (g, g + 8) x columns (2t.., 2t + 8..).
template <typename Tr>
__device__ __forceinline__ void convert_p(PFragment<Tr>& p, const float (&s)[Tr::kBlockN / 2]) {
  using T = typename Tr::Element;
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
    p[kk][0] = ptx::pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    p[kk][1] = ptx::pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    p[kk][2] = ptx::pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    p[kk][3] = ptx::pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

}  // namespace flashattn::cuda::sm90
