// flashattn-gpu-bench: times flashattn::forward on CUDA tensors.
//
//   flashattn-gpu-bench [--warmup 5] [--iters 20] [--dtype bf16|fp16] --case B,S,H,D,CAUSAL [--case ...]
//
// Each case is (batch, seqlen, heads, head_dim, causal 0/1) with seqlen_q = seqlen_k. Inputs are
// random (never zeros: zeros run faster than real data), every iteration is timed with its own
// pair of CUDA events, and one JSON object per case is printed:
//   {"batch":..,"seqlen":..,"heads":..,"head_dim":..,"causal":..,"ms":median,"ms_min":..,"tflops":..,
//    "kernel":"flash_fwd_sm90<...>"}  (the kernel the dispatch ran; FLASHATTN_CUDA_FORWARD=sm80 forces sm80)
// FLOPs = 4 * b * h * s * s * d, halved for causal (the FlashAttention papers' convention).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"

namespace {

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

// N(0,1)-ish values from a hash, rounded to bf16/fp16 (Irwin-Hall of 4 uniforms).
__global__ void fill_random(uint16_t* x, int64_t n, uint64_t seed, bool bf16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    float s = 0;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 31;
      h *= 0xBF58476D1CE4E5B9ull;
      h ^= h >> 29;
      s += float(h >> 40) * (1.0f / 16777216.0f);
    }
    const float v = (s - 2.0f) * 1.7320508f;
    if (bf16) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      x[i] = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    } else {
      x[i] = __half_as_ushort(__float2half_rn(v));
    }
  }
}

struct Case {
  int batch, seqlen, heads, head_dim;
  bool causal;
};

}  // namespace

int main(int argc, char** argv) {
  int warmup = 5, iters = 20;
  flashattn::DType dtype = flashattn::DType::bf16;
  std::vector<Case> cases;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--warmup") warmup = std::stoi(next());
    else if (a == "--iters") iters = std::stoi(next());
    else if (a == "--dtype") dtype = next() == "fp16" ? flashattn::DType::f16 : flashattn::DType::bf16;
    else if (a == "--case") {
      Case c{};
      int causal = 0;
      if (std::sscanf(next().c_str(), "%d,%d,%d,%d,%d", &c.batch, &c.seqlen, &c.heads, &c.head_dim, &causal) != 5) {
        std::fprintf(stderr, "--case wants B,S,H,D,CAUSAL\n");
        return 2;
      }
      c.causal = causal != 0;
      cases.push_back(c);
    } else {
      std::fprintf(stderr, "usage: %s [--warmup N] [--iters N] [--dtype bf16|fp16] --case B,S,H,D,CAUSAL ...\n", argv[0]);
      return 2;
    }
  }
  if (!flashattn::cuda_available()) {
    std::fprintf(stderr, "flashattn-gpu-bench: no usable sm80+ CUDA device\n");
    return 1;
  }
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  for (const Case& c : cases) {
    const int64_t n = int64_t(c.batch) * c.seqlen * c.heads * c.head_dim;
    uint16_t *q, *k, *v, *o;
    float* lse;
    CHECK(cudaMalloc(&q, n * 2));
    CHECK(cudaMalloc(&k, n * 2));
    CHECK(cudaMalloc(&v, n * 2));
    CHECK(cudaMalloc(&o, n * 2));
    CHECK(cudaMalloc(&lse, int64_t(c.batch) * c.heads * c.seqlen * 4));
    const bool bf16 = dtype == flashattn::DType::bf16;
    fill_random<<<1024, 256, 0, stream>>>(q, n, 1, bf16);
    fill_random<<<1024, 256, 0, stream>>>(k, n, 2, bf16);
    fill_random<<<1024, 256, 0, stream>>>(v, n, 3, bf16);
    CHECK(cudaGetLastError());
    const flashattn::Device dev = flashattn::Device::cuda(0);
    using flashattn::Tensor;
    const Tensor tq = Tensor::contiguous(q, dtype, {c.batch, c.seqlen, c.heads, c.head_dim}, dev);
    const Tensor tk = Tensor::contiguous(k, dtype, {c.batch, c.seqlen, c.heads, c.head_dim}, dev);
    const Tensor tv = Tensor::contiguous(v, dtype, {c.batch, c.seqlen, c.heads, c.head_dim}, dev);
    const Tensor to = Tensor::contiguous(o, dtype, {c.batch, c.seqlen, c.heads, c.head_dim}, dev);
    const Tensor tl = Tensor::contiguous(lse, flashattn::DType::f32, {c.batch, c.heads, c.seqlen}, dev);
    flashattn::Options opt;
    opt.causal = c.causal;
    opt.stream = stream;
    std::vector<cudaEvent_t> ev(2 * iters);
    for (auto& e : ev) CHECK(cudaEventCreate(&e));
    std::string kernel;
    try {
      kernel = flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, to, tl, opt, nullptr));
      for (int i = 0; i < warmup; ++i) flashattn::forward(tq, tk, tv, to, tl, opt);
      for (int i = 0; i < iters; ++i) {
        CHECK(cudaEventRecord(ev[2 * i], stream));
        flashattn::forward(tq, tk, tv, to, tl, opt);
        CHECK(cudaEventRecord(ev[2 * i + 1], stream));
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "flashattn-gpu-bench: %s\n", e.what());
      return 1;
    }
    CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
    std::sort(ms.begin(), ms.end());
    const double med = ms[iters / 2];
    const double flops = 4.0 * c.batch * c.heads * double(c.seqlen) * c.seqlen * c.head_dim / (c.causal ? 2 : 1);
    std::printf("{\"batch\":%d,\"seqlen\":%d,\"heads\":%d,\"head_dim\":%d,\"causal\":%s,\"dtype\":\"%s\","
                "\"ms\":%.5f,\"ms_min\":%.5f,\"tflops\":%.2f,\"kernel\":\"%s\"}\n",
                c.batch, c.seqlen, c.heads, c.head_dim, c.causal ? "true" : "false", bf16 ? "bf16" : "fp16", med,
                double(ms[0]), flops / (med * 1e-3) / 1e12, kernel.c_str());
    std::fflush(stdout);
    for (auto& e : ev) CHECK(cudaEventDestroy(e));
    CHECK(cudaFree(q));
    CHECK(cudaFree(k));
    CHECK(cudaFree(v));
    CHECK(cudaFree(o));
    CHECK(cudaFree(lse));
  }
  CHECK(cudaStreamDestroy(stream));
  return 0;
}
