// The two light passes around every CUDA backward kernel (sm80 and sm90), both memory-bound (each touches O, dO or
// dQ once) and small next to it:
//
//   preprocess   per query row: D = rowsum(dO * O) in fp32 and LSE * log2(e) (+inf for a row that
//                saw no key, so that exp2(S - it) = 0, never NaN) into the workspace; the row's
//                fp32 dQ accumulator zeroed. Rows past a sequence's end (block padding) get D = 0,
//                +inf, zeros.
//   postprocess  dQ = softmax_scale * accumulator, in the input dtype, through the dq strides.
//
// Both run one CTA of kBlockM rows per (query block, head, sequence), the main kernel's blocks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "core/params.h"
#include "cuda/common/ptx.h"
#include "cuda/common/bwd_workspace.cuh"

namespace flashattn::cuda {

namespace prepost_detail {

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t bits) {
  if constexpr (std::is_same_v<T, __half>)
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  else
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

}  // namespace prepost_detail

// kRowThreads threads share a row's dot product (16-byte chunks, then two shuffles).
template <typename Tr>
__global__ void __launch_bounds__(Tr::kBlockM * 4) flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p,
                                                                                 const BwdArgs args) {
  using T = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kRowThreads = 4, kThreads = kBlockM * kRowThreads;
  const int tid = threadIdx.x;

  int64_t bid = blockIdx.x;
  const int m_block = int(bid % args.m_blocks);
  bid /= args.m_blocks;
  const int h = int(bid % p.heads);
  const int b = int(bid / p.heads);
  const int64_t len_q = p.len_q(b);
  const int64_t m0 = int64_t(m_block) * kBlockM;
  if (m0 >= len_q) return;  // no block of the main kernel reads it
  const int64_t w = args.ws_index(p, b, h, m0);

  const int r = tid / kRowThreads, part = tid % kRowThreads;
  const int64_t i = m0 + r;
  float dot = 0.0f;
  if (i < len_q) {
    const T* o = static_cast<const T*>(p.out) + p.out_offset(b, i, h);
    const T* d_o = static_cast<const T*>(p.dout) + p.dout_offset(b, i, h);
    for (int chunk = part; chunk < p.head_dim_v / 8; chunk += kRowThreads) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + chunk * 8);
      const uint4 c = *reinterpret_cast<const uint4*>(d_o + chunk * 8);
      const uint32_t av[4] = {a.x, a.y, a.z, a.w}, cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 x = prepost_detail::unpack2<T>(av[k]), y = prepost_detail::unpack2<T>(cv[k]);
        dot = fmaf(x.x, y.x, dot);
        dot = fmaf(x.y, y.y, dot);
      }
    }
  }
  static_assert(kRowThreads == 4, "two shuffles reduce a row");
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  dot += __shfl_xor_sync(0xffffffffu, dot, 2);
  if (part == 0) {
    const float inf = __int_as_float(0x7f800000);
    const float lse = i < len_q ? p.lse[p.lse_offset(b, i, h)] : -inf;
    args.delta[w + r] = i < len_q ? dot : 0.0f;
    args.lse2[w + r] = lse == -inf ? inf : lse * 1.4426950408889634f;
  }

  float4* acc = reinterpret_cast<float4*>(args.dq_accum + w * Tr::kHeadDim);
  for (int idx = tid; idx < kBlockM * Tr::kHeadDim / 4; idx += kThreads) acc[idx] = make_float4(0, 0, 0, 0);
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kBlockM * 4) flash_bwd_postprocess_kernel(const __grid_constant__ BwdParams p,
                                                                                  const BwdArgs args) {
  using T = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kThreads = kBlockM * 4;

  int64_t bid = blockIdx.x;
  const int m_block = int(bid % args.m_blocks);
  bid /= args.m_blocks;
  const int h = int(bid % p.heads);
  const int b = int(bid / p.heads);
  const int64_t len_q = p.len_q(b);
  const int64_t m0 = int64_t(m_block) * kBlockM;
  if (m0 >= len_q) return;
  const float* acc = args.dq_accum + args.ws_index(p, b, h, m0) * Tr::kHeadDim;
  T* dq = static_cast<T*>(p.dq);
  const int chunks = p.head_dim / 8;
  const int64_t rows = len_q - m0 < kBlockM ? len_q - m0 : kBlockM;
  for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
    const int r = idx / chunks, chunk = idx % chunks;
    const float4 lo = *reinterpret_cast<const float4*>(acc + r * Tr::kHeadDim + chunk * 8);
    const float4 hi = *reinterpret_cast<const float4*>(acc + r * Tr::kHeadDim + chunk * 8 + 4);
    const float s = p.scale;
    const uint4 out = make_uint4(ptx::pack2<T>(lo.x * s, lo.y * s), ptx::pack2<T>(lo.z * s, lo.w * s),
                                 ptx::pack2<T>(hi.x * s, hi.y * s), ptx::pack2<T>(hi.z * s, hi.w * s));
    *reinterpret_cast<uint4*>(dq + p.dq_offset(b, m0 + r, h) + chunk * 8) = out;
  }
}

}  // namespace flashattn::cuda
