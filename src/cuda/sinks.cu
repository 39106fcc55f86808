// Attention sinks on CUDA (core/sink.h): the forward runs without them, then one pass folds each
// head's sink into every row's (O, LSE): O' = O * exp(LSE - LSE'), LSE' = logaddexp(LSE, sink).
// It reads and writes O once more (for decode shapes a few KiB); split-KV calls get the sink once,
// after their merge. And the sinks' gradient: one block per head, a fixed-order reduction
// (deterministic), no atomics.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/sink.h"
#include "cuda/backend.h"
#include "cuda/common/check.h"
#include "cuda/common/stream_workspace.h"
#include "flashattn/error.h"

namespace flashattn::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return float(x); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// One warp per (sequence b, row i, head h); rows past a varlen sequence are skipped.
template <typename T>
__global__ void fold_sinks_kernel(const AttnParams p) {
  const int64_t warp_id = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int h = int(warp_id % p.heads);
  const int64_t i = warp_id / p.heads % p.seqlen_q;
  const int64_t b = warp_id / p.heads / p.seqlen_q;
  if (b >= p.batch || i >= p.len_q(int(b))) return;
  float& lse = p.lse[p.lse_offset(int(b), i, h)];
  const SinkedRow s = add_sink(lse, p.sinks[h]);
  T* out = static_cast<T*>(p.out) + p.out_offset(int(b), i, h);
  for (int d = lane; d < p.head_dim_v; d += 32) out[d] = T(to_float(out[d]) * s.out_scale);
  __syncwarp();
  if (lane == 0) lse = s.lse;
}

template <typename T>
__global__ void sink_gradient_kernel(const SinkGradParams p) {
  const int h = blockIdx.x;
  __shared__ float partial[256];
  float sum = 0.0f;
  const int64_t rows = int64_t(p.batch) * p.seqlen_q;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int b = int(r / p.seqlen_q);
    const int64_t i = r % p.seqlen_q;
    if (i >= p.len_q(b)) continue;
    const T* o = static_cast<const T*>(p.out) + p.out_offset(b, i, h);
    const T* g = static_cast<const T*>(p.dout) + p.dout_offset(b, i, h);
    float dot = 0.0f;
    for (int d = 0; d < p.head_dim_v; ++d) dot += to_float(o[d]) * to_float(g[d]);
    sum += -expf(p.sinks[h] - p.lse[p.lse_offset(b, i, h)]) * dot;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.dsinks[h] = partial[0];
}

}  // namespace

void forward_with_sinks(const AttnParams& p) {
  AttnParams plain = p;
  plain.sinks = nullptr;
  auto stream = static_cast<cudaStream_t>(p.stream);
  // The fold needs the LSE; a caller that wants none gets a scratch one (stream-ordered).
  const bool scratch_lse = plain.lse == nullptr;
  StreamWorkspace lse(scratch_lse ? size_t(std::max<int64_t>(1, p.total_q)) * p.heads * sizeof(float) : 1, stream);
  if (scratch_lse) {
    plain.lse = reinterpret_cast<float*>(lse.data());
    if (p.cu_seqlens_q) {  // (heads, total_q)
      plain.lse_batch_stride = 0;
      plain.lse_head_stride = p.total_q;
    } else {  // (batch, heads, seqlen_q)
      plain.lse_batch_stride = int64_t(p.heads) * p.seqlen_q;
      plain.lse_head_stride = p.seqlen_q;
    }
  }
  forward(plain);
  const int64_t warps = int64_t(p.batch) * p.seqlen_q * p.heads;
  if (warps == 0) return;
  AttnParams fold = plain;
  fold.sinks = p.sinks;
  const int threads = 256;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  if (p.dtype == DType::bf16)
    fold_sinks_kernel<__nv_bfloat16><<<unsigned(blocks), threads, 0, stream>>>(fold);
  else
    fold_sinks_kernel<__half><<<unsigned(blocks), threads, 0, stream>>>(fold);
  FA_CHECK_LAUNCH("fold_sinks_kernel");
}

void sink_gradient(const SinkGradParams& p) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) throw Error("out", "fp16 or bf16 on CUDA", dtype_name(p.dtype));
  DeviceGuard guard(p.device.index);
  if (p.heads == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
  if (p.dtype == DType::bf16)
    sink_gradient_kernel<__nv_bfloat16><<<p.heads, 256, 0, stream>>>(p);
  else
    sink_gradient_kernel<__half><<<p.heads, 256, 0, stream>>>(p);
  FA_CHECK_LAUNCH("sink_gradient_kernel");
}

}  // namespace flashattn::cuda
