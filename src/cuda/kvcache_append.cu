// forward_kvcache on CUDA: the append of the new tokens into the cache (rotary on the keys) and the
// rotated copy of q, as two small kernels on the caller's stream, then the usual forward over the
// cache. Nothing is read back on the host and the only allocation is the stream-ordered workspace
// of the rotated q, so a decode step with appends stays capturable in a CUDA graph.
//
// The index tensors (cache_seqlens, cache_batch_idx, cache_leftpad, page_table) live on the device
// and are trusted, as flash_attn trusts them (FLASHATTN_CHECK_LENGTHS=1 checks them on the host
// first). The kernels still never write outside the cache: a slot past the capacity, a cache row
// or a page id out of range makes that row's append a no-op.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "core/rotary.h"
#include "cuda/backend.h"
#include "cuda/common/check.h"
#include "cuda/common/stream_workspace.h"
#include "flashattn/error.h"

namespace flashattn::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

// Element d of a row rotated at table row `pos` (core/rotary.h): reads both elements of d's pair
// from the source row, so every thread writes only its own element.
template <typename T>
__device__ __forceinline__ float rotated_element(const KVCacheParams& kp, const T* row, int d, int64_t pos) {
  const float x = to_float(row[d]);
  if (d >= kp.rotary_dim) return x;
  const int half = kp.rotary_dim / 2;
  const int i = kp.rotary_interleaved ? d / 2 : d % half;
  const RotaryPair pair = rotary_pair(i, kp.rotary_dim, kp.rotary_interleaved);
  float x0 = to_float(row[pair.first]), x1 = to_float(row[pair.second]);
  const float c = to_float(static_cast<const T*>(kp.rotary_cos)[pos * kp.rotary_cos_row_stride + i]);
  const float s = to_float(static_cast<const T*>(kp.rotary_sin)[pos * kp.rotary_sin_row_stride + i]);
  rotate(x0, x1, c, s);
  return d == pair.first ? x0 : x1;
}

// Whether slot `key` (a key index of sequence b, AttnParams's numbering) lies inside the cache.
__device__ __forceinline__ bool inside_cache(const KVCacheParams& kp, int b, int64_t key) {
  const AttnParams& p = kp.attn;
  const int64_t slot = p.k_start(b) + key;
  if (key < 0 || slot < 0 || slot >= p.seqlen_k) return false;  // seqlen_k: the capacity
  return p.kv_row_in_cache(b, key);
}

// One block per new token (j, b); threads over (kv head, dim).
template <typename T>
__global__ void append_kernel(const KVCacheParams kp) {
  const AttnParams& p = kp.attn;
  const int64_t j = blockIdx.x;
  const int b = blockIdx.y;
  const int64_t key = kp.new_key_index(b, j);
  if (!inside_cache(kp, b, key)) return;
  const int64_t pos = kp.cache_seqlens[b] + j;  // < capacity <= seqlen_ro (validated on the host)
  T* k_cache = static_cast<T*>(const_cast<void*>(p.k));
  T* v_cache = static_cast<T*>(const_cast<void*>(p.v));
  for (int e = threadIdx.x; e < p.heads_k * p.head_dim; e += blockDim.x) {
    const int hk = e / p.head_dim, d = e % p.head_dim;
    const T* src = static_cast<const T*>(kp.k_new) + b * kp.k_new_stride.batch + j * kp.k_new_stride.row +
                   hk * kp.k_new_stride.head;
    k_cache[p.k_offset(b, key, hk) + d] = kp.rotary_dim > 0 ? from_float<T>(rotated_element(kp, src, d, pos)) : src[d];
  }
  for (int e = threadIdx.x; e < p.heads_k * p.head_dim_v; e += blockDim.x) {
    const int hk = e / p.head_dim_v, d = e % p.head_dim_v;
    v_cache[p.v_offset(b, key, hk) + d] = static_cast<const T*>(kp.v_new)[b * kp.v_new_stride.batch +
                                                                         j * kp.v_new_stride.row +
                                                                         hk * kp.v_new_stride.head + d];
  }
}

// One block per query row (i, b): q rotated into a dense (batch, seqlen_q, heads, d) buffer.
template <typename T>
__global__ void rotate_q_kernel(const KVCacheParams kp, T* q_rotated) {
  const AttnParams& p = kp.attn;
  const int64_t i = blockIdx.x;
  const int b = blockIdx.y;
  int64_t pos = rotary_query_position(kp.cache_seqlens[b], i, kp.rotary_per_query);
  pos = pos < 0 ? 0 : (pos >= kp.seqlen_ro ? kp.seqlen_ro - 1 : pos);  // trusted lengths: stay in the tables
  for (int e = threadIdx.x; e < p.heads * p.head_dim; e += blockDim.x) {
    const int h = e / p.head_dim, d = e % p.head_dim;
    const T* src = static_cast<const T*>(p.q) + p.q_offset(b, i, h);
    q_rotated[((int64_t(b) * p.seqlen_q + i) * p.heads + h) * p.head_dim + d] =
        from_float<T>(rotated_element(kp, src, d, pos));
  }
}

template <typename T>
void run(const KVCacheParams& kp, cudaStream_t stream) {
  const AttnParams& p = kp.attn;
  const int threads = 128;
  if (kp.seqlen_new > 0 && p.batch > 0) {
    append_kernel<T><<<dim3(unsigned(kp.seqlen_new), unsigned(p.batch)), threads, 0, stream>>>(kp);
    FA_CHECK_LAUNCH("kvcache append_kernel");
  }
  AttnParams attn = kp.attn;
  if (kp.rotary_dim > 0 && p.batch > 0 && p.seqlen_q > 0) {
    StreamWorkspace q_rotated(size_t(p.total_q) * p.heads * p.head_dim * sizeof(T), stream);
    rotate_q_kernel<T><<<dim3(unsigned(p.seqlen_q), unsigned(p.batch)), threads, 0, stream>>>(
        kp, reinterpret_cast<T*>(q_rotated.data()));
    FA_CHECK_LAUNCH("kvcache rotate_q_kernel");
    attn.q = q_rotated.data();
    attn.q_stride = Strides{p.seqlen_q * p.heads * p.head_dim, int64_t(p.heads) * p.head_dim, p.head_dim};
    forward(attn);  // queued before the workspace is freed (stream order)
    return;
  }
  forward(attn);
}

}  // namespace

void forward_kvcache(const KVCacheParams& kp) {
  const AttnParams& p = kp.attn;
  if (p.dtype != DType::bf16 && p.dtype != DType::f16)
    throw Error("q", "fp16 or bf16 on CUDA", dtype_name(p.dtype));
  if (kp.seqlen_new > 0 && kp.seqlen_new > 65535)
    throw Error("k", "at most 65535 new tokens per call on CUDA", std::to_string(kp.seqlen_new));
  if (p.batch > 65535) throw Error("q", "a batch of at most 65535 on CUDA (the append grid)", std::to_string(p.batch));
  DeviceGuard guard(p.device.index);
  require_sm80(p.device.index, "the CUDA kvcache forward");
  check_forward_supported(p);  // everything the forward could still refuse, before the first write
  auto stream = static_cast<cudaStream_t>(p.stream);
  if (p.dtype == DType::bf16)
    run<__nv_bfloat16>(kp, stream);
  else
    run<__half>(kp, stream);
}

}  // namespace flashattn::cuda
