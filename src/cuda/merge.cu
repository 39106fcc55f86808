// merge() on CUDA: LSE = log sum_c exp(LSE_c), O = sum_c exp(LSE_c - LSE) O_c, one warp per
// output row (batch, query, head). Memory-bound and small next to attention itself.
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

template <typename T>
__device__ __forceinline__ void store_out(void* base, int64_t index, float v) {
  if constexpr (std::is_same_v<T, float>)
    static_cast<float*>(base)[index] = v;
  else if constexpr (std::is_same_v<T, __half>)
    static_cast<__half*>(base)[index] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) merge_kernel(const __grid_constant__ MergeParams m) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(m.batch) * m.seqlen_q * m.heads) return;
  const int h = int(row % m.heads);
  const int64_t i = row / m.heads % m.seqlen_q;
  const int b = int(row / (int64_t(m.heads) * m.seqlen_q));
  const float* lse_c = m.partial_lse + b * m.pl_batch_stride + h * m.pl_head_stride + i * m.pl_row_stride;
  const float* po = m.partial_out + b * m.po_batch_stride + i * m.po_row_stride + h * m.po_head_stride;
  const float neg_inf = -__int_as_float(0x7f800000);

  float lse_max = neg_inf;
  for (int c = 0; c < m.splits; ++c) lse_max = fmaxf(lse_max, lse_c[c * m.pl_split_stride]);
  const int64_t out_base = b * m.out_stride.batch + i * m.out_stride.row + h * m.out_stride.head;
  float lse = neg_inf, inv_sum = 0;
  if (lse_max != neg_inf) {  // some split saw a key
    float sum = 0;
    for (int c = 0; c < m.splits; ++c) sum += expf(lse_c[c * m.pl_split_stride] - lse_max);
    lse = lse_max + logf(sum);
    inv_sum = 1.0f / sum;
  }
  for (int d = lane; d < m.head_dim_v; d += 32) {
    float acc = 0;
    if (lse != neg_inf)
      for (int c = 0; c < m.splits; ++c) {
        // Relative to the largest LSE, normalised by the sum: exp(LSE_c - LSE) through a rounded
        // LSE would scale every weight by |LSE| * 2^-24.
        const float w = expf(lse_c[c * m.pl_split_stride] - lse_max) * inv_sum;
        if (w != 0) acc += w * po[c * m.po_split_stride + d];  // an empty split's O may be unwritten
      }
    store_out<T>(m.out, out_base + d, acc);
  }
  if (lane == 0) m.lse[b * m.lse_batch_stride + h * m.lse_head_stride + i * m.lse_row_stride] = lse;
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
