// merge() on CUDA, and the combine step of the split-KV forward:
//   LSE = log sum_c exp(LSE_c),  O = sum_c exp(LSE_c - LSE) O_c
// One warp per output row (batch, query, head). The lanes first read 32 splits' LSEs at a time
// (max and sum by shuffles), then walk the splits with each weight broadcast from its lane, every
// lane accumulating its columns: any number of splits, two dependent rounds of loads.
// Memory-bound and small next to attention itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "cuda/backend.h"
#include "cuda/common/check.h"

namespace flashattn::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxColsPerLane = 8;  // columns per lane and pass: 256 per pass covers head dims <= 256 in one

template <typename T>
__device__ __forceinline__ void store_out(void* base, int64_t index, float v) {
  if constexpr (std::is_same_v<T, float>)
    static_cast<float*>(base)[index] = v;
  else if constexpr (std::is_same_v<T, __half>)
    static_cast<__half*>(base)[index] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) merge_kernel(const __grid_constant__ MergeParams m) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(m.batch) * m.seqlen_q * m.heads) return;
  const int h = int(row % m.heads);
  const int64_t i = row / m.heads % m.seqlen_q;
  const int b = int(row / (int64_t(m.heads) * m.seqlen_q));
  int64_t out_row = i;
  if (m.cu_seqlens_q) {  // varlen output: packed rows; rows past this sequence's length are not its own
    if (i >= m.cu_seqlens_q[b + 1] - m.cu_seqlens_q[b]) return;
    out_row = m.cu_seqlens_q[b] + i;
  }
  const float* lse_c = m.partial_lse + b * m.pl_batch_stride + h * m.pl_head_stride + i * m.pl_row_stride;
  const float* po = m.partial_out + b * m.po_batch_stride + i * m.po_row_stride + h * m.po_head_stride;
  const float neg_inf = -__int_as_float(0x7f800000);

  // Pass 1: the largest LSE and the sum of exp(LSE_c - max), 32 splits per round.
  float lse_max = neg_inf;
  for (int c = lane; c < m.splits; c += 32) lse_max = fmaxf(lse_max, lse_c[int64_t(c) * m.pl_split_stride]);
  lse_max = warp_max(lse_max);
  float sum = 0;
  if (lse_max != neg_inf)
    for (int c = lane; c < m.splits; c += 32) sum += expf(lse_c[int64_t(c) * m.pl_split_stride] - lse_max);
  sum = warp_sum(sum);
  // Weights relative to the largest LSE, normalised by the sum: exp(LSE_c - LSE) through a rounded
  // LSE would scale every weight by |LSE| * 2^-24. No visible key anywhere: O = 0, LSE = -inf.
  const float inv_sum = lse_max != neg_inf ? 1.0f / sum : 0.0f;

  // Pass 2: lane c of each round holds split c's weight; it is broadcast while every lane
  // accumulates its columns d0 + lane, d0 + lane + 32, ... (256 columns per pass).
  const int64_t out_base = b * m.out_stride.batch + out_row * m.out_stride.row + h * m.out_stride.head;
  for (int d0 = 0; d0 < m.head_dim_v; d0 += 32 * kMaxColsPerLane) {
    float acc[kMaxColsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) acc[k] = 0.0f;
    if (lse_max != neg_inf)
      for (int c0 = 0; c0 < m.splits; c0 += 32) {
        const int c_lane = c0 + lane;
        const float w_lane =
            c_lane < m.splits ? expf(lse_c[int64_t(c_lane) * m.pl_split_stride] - lse_max) * inv_sum : 0.0f;
        const int n = m.splits - c0 < 32 ? m.splits - c0 : 32;
        // Unrolled so that several splits' loads are in flight at once (the loads are
        // unconditional for that; only the accumulation skips a zero weight, because an empty
        // split's O may be unwritten memory, NaN say).
#pragma unroll 8
        for (int j = 0; j < n; ++j) {
          const float w = __shfl_sync(0xffffffffu, w_lane, j);
          const float* src = po + int64_t(c0 + j) * m.po_split_stride + d0;
#pragma unroll
          for (int k = 0; k < kMaxColsPerLane; ++k) {
            const int d = lane + 32 * k;
            if (d0 + d < m.head_dim_v) {
              const float x = src[d];
              if (w != 0) acc[k] += w * x;
            }
          }
        }
      }
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) {
      const int d = d0 + lane + 32 * k;
      if (d < m.head_dim_v) store_out<T>(m.out, out_base + d, acc[k]);
    }
  }
  if (lane == 0)
    m.lse[b * m.lse_batch_stride + h * m.lse_head_stride + out_row * m.lse_row_stride] =
        lse_max != neg_inf ? lse_max + logf(sum) : neg_inf;
}

}  // namespace

void merge(const MergeParams& m) {
  DeviceGuard guard(m.device.index);
  require_sm80(m.device.index, "the CUDA merge");
  const int64_t rows = int64_t(m.batch) * m.seqlen_q * m.heads;
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT_MAX) throw std::runtime_error("flashattn: CUDA merge: too many rows for one grid");
  auto stream = static_cast<cudaStream_t>(m.stream);
  const dim3 grid{unsigned(blocks)}, block{kWarpsPerBlock * 32};
  switch (m.out_dtype) {
    case DType::f32: merge_kernel<float><<<grid, block, 0, stream>>>(m); break;
    case DType::f16: merge_kernel<__half><<<grid, block, 0, stream>>>(m); break;
    case DType::bf16: merge_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(m); break;
    default: throw std::runtime_error("flashattn: CUDA merge: unsupported output dtype");
  }
  FA_CHECK_LAUNCH("merge_kernel");
}

}  // namespace flashattn::cuda
