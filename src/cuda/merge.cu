// merge() on CUDA, and the combine step of the split-KV forward:
//   LSE = log sum_c exp(LSE_c),  O = sum_c exp(LSE_c - LSE) O_c
// One CTA per output row (batch, query, head). Its threads first reduce the splits' LSEs (max,
// then the sum of exp(LSE_c - max)); then warp w accumulates splits w, w + warps, ... over the
// row's columns (16-byte loads where the layout allows, several splits' loads in flight), and the
// warps' sums meet in shared memory. Every load of a round is independent, so a row costs about
// two memory round trips whatever the split count: the combine stays a few microseconds where
// a decode step itself is tens.
//
// Launched as a programmatic dependent of the split forward kernel (sm90+): it can be resident
// before that kernel ends and waits (griddepcontrol.wait) only where it first reads its output.
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

constexpr int kWarps = 8;           // per CTA; warp w takes splits w, w + kWarps, ...
constexpr int kSplitsInFlight = 4;  // splits a warp loads before it accumulates them

__device__ __forceinline__ void wait_for_producer_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ void store_out(void* base, int64_t index, float v) {
  if constexpr (std::is_same_v<T, float>)
    static_cast<float*>(base)[index] = v;
  else if constexpr (std::is_same_v<T, __half>)
    static_cast<__half*>(base)[index] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(v);
}

// kVec: columns per lane and load (4: 16-byte loads, when the partial layout is 16-byte aligned).
template <typename T, int kVec>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(const __grid_constant__ MergeParams m) {
  constexpr int kColsPerPass = 32 * kVec;
  __shared__ float smem_red[kWarps];
  __shared__ float smem_acc[kWarps][kColsPerPass];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const float neg_inf = -__int_as_float(0x7f800000);

  const int64_t row = blockIdx.x;
  const int h = int(row % m.heads);
  const int64_t i = row / m.heads % m.seqlen_q;
  const int b = int(row / (int64_t(m.heads) * m.seqlen_q));
  int64_t out_row = i;
  if (m.seqused_q && i >= m.seqused_q[b]) return;  // a row the sequence does not use: not written
  if (m.cu_seqlens_q) {  // varlen output: packed rows; rows past this sequence's length are not its own
    if (i >= m.cu_seqlens_q[b + 1] - m.cu_seqlens_q[b]) return;
    out_row = m.cu_seqlens_q[b] + i;
  }
  const float* lse_c = m.partial_lse + b * m.pl_batch_stride + h * m.pl_head_stride + i * m.pl_row_stride;
  const float* po = m.partial_out + b * m.po_batch_stride + i * m.po_row_stride + h * m.po_head_stride;

  wait_for_producer_grid();

  // The largest LSE, then the sum of exp(LSE_c - max), over all threads of the CTA.
  auto block_reduce = [&](float x, bool is_max) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) smem_red[warp] = x;
    __syncthreads();
    x = smem_red[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) x = is_max ? fmaxf(x, smem_red[w]) : x + smem_red[w];
    __syncthreads();  // smem_red is reused
    return x;
  };
  float x = neg_inf;
  for (int c = tid; c < m.splits; c += kWarps * 32) x = fmaxf(x, lse_c[int64_t(c) * m.pl_split_stride]);
  const float lse_max = block_reduce(x, true);
  x = 0.0f;
  if (lse_max != neg_inf)
    for (int c = tid; c < m.splits; c += kWarps * 32) x += expf(lse_c[int64_t(c) * m.pl_split_stride] - lse_max);
  const float sum = block_reduce(x, false);
  // Weights relative to the largest LSE, normalised by the sum: exp(LSE_c - LSE) through a rounded
  // LSE would scale every weight by |LSE| * 2^-24. No visible key anywhere: O = 0, LSE = -inf.
  const float inv_sum = lse_max != neg_inf ? 1.0f / sum : 0.0f;

  const int64_t out_base = b * m.out_stride.batch + out_row * m.out_stride.row + h * m.out_stride.head;
  for (int d0 = 0; d0 < m.head_dim_v; d0 += kColsPerPass) {
    const int d = d0 + lane * kVec;  // this lane's first column
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.0f;
    if (lse_max != neg_inf && d < m.head_dim_v) {
      for (int c0 = warp; c0 < m.splits; c0 += kWarps * kSplitsInFlight) {
        // Loads first (unconditional, so they are all in flight together), weights after: an
        // empty split (weight 0) may have left its O unwritten, NaN say, so it is skipped, not scaled.
        float v[kSplitsInFlight][kVec], w[kSplitsInFlight];
#pragma unroll
        for (int j = 0; j < kSplitsInFlight; ++j) {
          const int c = c0 + j * kWarps;
          const bool ok = c < m.splits;
          const float* src = po + int64_t(ok ? c : 0) * m.po_split_stride + d;
          if constexpr (kVec == 4) {
            const float4 q = *reinterpret_cast<const float4*>(src);
            v[j][0] = q.x, v[j][1] = q.y, v[j][2] = q.z, v[j][3] = q.w;
          } else {
            v[j][0] = *src;
          }
          w[j] = ok ? expf(lse_c[int64_t(c) * m.pl_split_stride] - lse_max) * inv_sum : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < kSplitsInFlight; ++j)
          if (w[j] != 0.0f)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[e] += w[j] * v[j][e];
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) smem_acc[warp][lane * kVec + e] = acc[e];
    __syncthreads();
    for (int col = tid; col < kColsPerPass && d0 + col < m.head_dim_v; col += kWarps * 32) {
      float o = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += smem_acc[w][col];
      store_out<T>(m.out, out_base + d0 + col, o);
    }
    __syncthreads();  // smem_acc is reused by the next pass
  }
  if (tid == 0 && m.lse)  // null: the forward's caller wants no LSE
    m.lse[b * m.lse_batch_stride + h * m.lse_head_stride + out_row * m.lse_row_stride] =
        lse_max != neg_inf ? lse_max + logf(sum) : neg_inf;
}

template <typename T>
void launch_merge(const MergeParams& m, int64_t rows, cudaStream_t stream) {
  // 16-byte loads when every partial row starts 16-byte aligned.
  const bool vec4 = reinterpret_cast<uintptr_t>(m.partial_out) % 16 == 0 && m.head_dim_v % 4 == 0 &&
                    m.po_split_stride % 4 == 0 && m.po_batch_stride % 4 == 0 && m.po_row_stride % 4 == 0 &&
                    m.po_head_stride % 4 == 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(rows));
  config.blockDim = dim3(kWarps * 32);
  config.stream = stream;
  // Programmatic dependent launch: this grid may start while the kernel before it on the stream
  // (the split forward) finishes; griddepcontrol.wait in the kernel orders the reads. Ignored
  // before sm90.
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (vec4)
    FA_CUDA_CHECK(cudaLaunchKernelEx(&config, merge_kernel<T, 4>, m));
  else
    FA_CUDA_CHECK(cudaLaunchKernelEx(&config, merge_kernel<T, 1>, m));
  FA_CHECK_LAUNCH("merge_kernel");
}

}  // namespace

void merge(const MergeParams& m) {
  DeviceGuard guard(m.device.index);
  require_sm80(m.device.index, "the CUDA merge");
  const int64_t rows = int64_t(m.batch) * m.seqlen_q * m.heads;
  if (rows == 0) return;
  if (rows > INT_MAX) throw std::runtime_error("flashattn: CUDA merge: too many rows for one grid");
  auto stream = static_cast<cudaStream_t>(m.stream);
  switch (m.out_dtype) {
    case DType::f32: return launch_merge<float>(m, rows, stream);
    case DType::f16: return launch_merge<__half>(m, rows, stream);
    case DType::bf16: return launch_merge<__nv_bfloat16>(m, rows, stream);
    default: throw std::runtime_error("flashattn: CUDA merge: unsupported output dtype");
  }
}

}  // namespace flashattn::cuda
