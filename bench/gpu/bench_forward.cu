// flashattn-gpu-bench: times flashattn::forward (or backward) on CUDA tensors.
//
//   flashattn-gpu-bench [--warmup 5] [--iters 20] [--dtype bf16|fp16] [--read-bandwidth MiB]
//                       [--rotate-kv] [--backward [--deterministic]] [--softcap C]
//                       [--window LEFT[,RIGHT]] [--alibi] [--docs L1,L2,...]
//                       --case B,S,H,D,CAUSAL[,HK[,SQ[,SPLITS]]] [--case ...]
//
// Each case is (batch, seqlen_k, heads, head_dim, causal 0/1), optionally kv heads HK (0 or absent:
// = heads), seqlen_q SQ (0 or absent: = seqlen_k; 1 for a decode step) and options.num_splits
// SPLITS (absent: 0, the heuristic). Inputs are random (never zeros: zeros run faster than real
// data), every iteration is timed with its own pair of CUDA events, and one JSON object per case
// is printed:
//   {"batch":..,"seqlen":..,"seqlen_q":..,"heads":..,"heads_k":..,"head_dim":..,"causal":..,
//    "num_splits":..,"pass":..,"ms":median,"ms_min":..,"tflops":..,"bytes":..,"tbps":..,
//    "kernel":"flash_fwd_sm90<...>"}  (the kernel the dispatch picks: the forward's, with --backward the
//    backward's main kernel; FLASHATTN_CUDA_FORWARD=sm80 / FLASHATTN_CUDA_BACKWARD=sm80 force sm80)
// FLOPs = 4 * b * h * sq * sk * d, halved for causal (the FlashAttention papers' convention);
// bytes = q + k + v + out once (the memory-bound floor of decoding), tbps = bytes / median.
// --backward: runs the forward once for out/lse, then times flashattn::backward alone (workspace
// allocation, preprocess, main kernel, postprocess); FLOPs count 2.5 times the forward's and the
// JSON says "pass":"bwd".
// --window LEFT[,RIGHT]: a sliding window (RIGHT defaults to 0 under causal, else unbounded).
// --alibi: ALiBi with the usual geometric slopes 2^(-8 (h + 1) / heads).
// --docs L1,L2,...: every case becomes one varlen batch of these documents (packed (total, heads,
// d) tensors, cu_seqlens on the device; the case's B and S are ignored) and FLOPs are summed per
// document. With a window, FLOPs count only the (query, key) pairs the mask lets through.
// --rotate-kv: when a case's K/V is not several times the L2 size, copies of it are rotated so that
// every call reads its K/V from HBM (decoding: what a real step does).
// --read-bandwidth N: first times a plain streaming read of N MiB (16-byte loads, nothing stored
// but one word per block) and prints {"read_tbps":..}, the read-only ceiling.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/mask.h"
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

// Reads n 16-byte vectors, keeps 4 loads in flight per thread, stores one word per block (so
// the loads are not dead code): the read-only HBM ceiling.
__global__ void read_stream(const uint4* __restrict__ x, int64_t n, uint32_t* __restrict__ sink) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = x[i], b = x[i + stride], c = x[i + 2 * stride], d = x[i + 3 * stride];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = x[i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if (threadIdx.x % 32 == 0) atomicXor(sink + blockIdx.x, acc);
}

struct Case {
  int batch, seqlen, heads, head_dim;
  bool causal;
  int heads_k = 0, seqlen_q = 0, num_splits = 0;
};

// The (query, key) pairs a mask lets through, row by row.
double visible_pairs(int64_t seqlen_q, int64_t seqlen_k, int64_t window_left, int64_t window_right) {
  const flashattn::Mask mask = flashattn::Mask::make(seqlen_q, seqlen_k, window_left, window_right);
  double pairs = 0;
  for (int64_t i = 0; i < seqlen_q; ++i) pairs += double(std::max<int64_t>(0, mask.key_end(i) - mask.key_begin(i)));
  return pairs;
}

template <typename T>
float median_of(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int warmup = 5, iters = 20;
  int64_t read_mib = 0;
  bool rotate_kv = false;
  bool backward = false, deterministic = false;
  float softcap = 0.0f;  // > 0: the tanh softcap on every score (flash_attn's softcap)
  int window_left = -1, window_right = -2;  // -2: 0 under causal, else unbounded
  bool alibi = false;
  std::vector<int> docs;  // non-empty: each case is one varlen batch of these documents
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
    else if (a == "--read-bandwidth") read_mib = std::stoll(next());
    else if (a == "--rotate-kv") rotate_kv = true;
    else if (a == "--backward") backward = true;
    else if (a == "--deterministic") deterministic = true;
    else if (a == "--softcap") softcap = std::stof(next());
    else if (a == "--window") {
      if (std::sscanf(next().c_str(), "%d,%d", &window_left, &window_right) < 1) {
        std::fprintf(stderr, "--window wants LEFT[,RIGHT]\n");
        return 2;
      }
    } else if (a == "--alibi") alibi = true;
    else if (a == "--docs") {
      const std::string list = next();
      for (size_t pos = 0; pos < list.size();) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        docs.push_back(std::stoi(list.substr(pos, comma - pos)));
        pos = comma + 1;
      }
    }
    else if (a == "--case") {
      Case c{};
      int causal = 0;
      const int n = std::sscanf(next().c_str(), "%d,%d,%d,%d,%d,%d,%d,%d", &c.batch, &c.seqlen, &c.heads, &c.head_dim,
                                &causal, &c.heads_k, &c.seqlen_q, &c.num_splits);
      if (n < 5) {
        std::fprintf(stderr, "--case wants B,S,H,D,CAUSAL[,HK[,SQ[,SPLITS]]]\n");
        return 2;
      }
      c.causal = causal != 0;
      if (c.heads_k <= 0) c.heads_k = c.heads;
      if (c.seqlen_q <= 0) c.seqlen_q = c.seqlen;
      cases.push_back(c);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--warmup N] [--iters N] [--dtype bf16|fp16] [--read-bandwidth MiB] [--rotate-kv] "
                   "[--backward [--deterministic]] [--softcap C] [--window LEFT[,RIGHT]] [--alibi] [--docs L1,..] "
                   "--case B,S,H,D,CAUSAL[,HK[,SQ[,SPLITS]]] ...\n",
                   argv[0]);
      return 2;
    }
  }
  if (!flashattn::cuda_available()) {
    std::fprintf(stderr, "flashattn-gpu-bench: no usable sm80+ CUDA device\n");
    return 1;
  }
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  if (read_mib > 0) {
    const int64_t n = read_mib * (1 << 20) / 16;
    uint4* x;
    uint32_t* sink;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int blocks = sms * 8;
    CHECK(cudaMalloc(&x, n * 16));
    CHECK(cudaMalloc(&sink, blocks * 4));
    fill_random<<<1024, 256, 0, stream>>>(reinterpret_cast<uint16_t*>(x), n * 8, 7, true);
    std::vector<cudaEvent_t> ev(2 * iters);
    for (auto& e : ev) CHECK(cudaEventCreate(&e));
    for (int i = 0; i < warmup; ++i) read_stream<<<blocks, 256, 0, stream>>>(x, n, sink);
    for (int i = 0; i < iters; ++i) {
      CHECK(cudaEventRecord(ev[2 * i], stream));
      read_stream<<<blocks, 256, 0, stream>>>(x, n, sink);
      CHECK(cudaEventRecord(ev[2 * i + 1], stream));
    }
    CHECK(cudaGetLastError());
    CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
    std::printf("{\"read_mib\":%lld,\"read_ms\":%.5f,\"read_tbps\":%.3f}\n", (long long)read_mib, median_of(ms),
                double(n) * 16 / (median_of(ms) * 1e-3) / 1e12);
    std::fflush(stdout);
    for (auto& e : ev) CHECK(cudaEventDestroy(e));
    CHECK(cudaFree(x));
    CHECK(cudaFree(sink));
  }
  int64_t l2_bytes = 0;
  {
    int l2 = 0;
    CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    l2_bytes = l2;
  }
  for (Case c : cases) {
    // Varlen: the documents are the batch; rows are counted over all of them.
    const bool varlen = !docs.empty();
    int64_t total_q = int64_t(c.batch) * c.seqlen_q, total_k = int64_t(c.batch) * c.seqlen;
    std::vector<int32_t> cu(docs.size() + 1, 0);
    if (varlen) {
      for (size_t i = 0; i < docs.size(); ++i) cu[i + 1] = cu[i] + docs[i];
      c.batch = int(docs.size());
      c.seqlen = c.seqlen_q = *std::max_element(docs.begin(), docs.end());
      total_q = total_k = cu.back();
    }
    const int64_t nq = total_q * c.heads * c.head_dim;
    const int64_t nkv = total_k * c.heads_k * c.head_dim;
    // Enough K/V copies that one call's K/V is gone from L2 when its turn comes again.
    const int copies =
        rotate_kv && !backward ? int(std::min<int64_t>(64, std::max<int64_t>(1, (4 * l2_bytes + 4 * nkv - 1) / (4 * nkv)))) : 1;
    uint16_t *q, *o;
    std::vector<uint16_t*> k(copies), v(copies);
    float *lse, *slopes = nullptr;
    int32_t* cu_dev = nullptr;
    CHECK(cudaMalloc(&q, nq * 2));
    CHECK(cudaMalloc(&o, nq * 2));
    CHECK(cudaMalloc(&lse, total_q * c.heads * 4));
    if (varlen) {
      CHECK(cudaMalloc(&cu_dev, cu.size() * 4));
      CHECK(cudaMemcpy(cu_dev, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice));
    }
    if (alibi) {
      std::vector<float> host(c.heads);
      for (int h = 0; h < c.heads; ++h) host[h] = std::exp2(-8.0f * float(h + 1) / float(c.heads));
      CHECK(cudaMalloc(&slopes, c.heads * 4));
      CHECK(cudaMemcpy(slopes, host.data(), c.heads * 4, cudaMemcpyHostToDevice));
    }
    uint16_t *d_o = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
    if (backward) {
      CHECK(cudaMalloc(&d_o, nq * 2));
      CHECK(cudaMalloc(&dq, nq * 2));
      CHECK(cudaMalloc(&dk, nkv * 2));
      CHECK(cudaMalloc(&dv, nkv * 2));
    }
    const bool bf16 = dtype == flashattn::DType::bf16;
    fill_random<<<1024, 256, 0, stream>>>(q, nq, 1, bf16);
    if (backward) fill_random<<<1024, 256, 0, stream>>>(d_o, nq, 4, bf16);
    for (int i = 0; i < copies; ++i) {
      CHECK(cudaMalloc(&k[i], nkv * 2));
      CHECK(cudaMalloc(&v[i], nkv * 2));
      fill_random<<<1024, 256, 0, stream>>>(k[i], nkv, 2 + 2 * i, bf16);
      fill_random<<<1024, 256, 0, stream>>>(v[i], nkv, 3 + 2 * i, bf16);
    }
    CHECK(cudaGetLastError());
    const flashattn::Device dev = flashattn::Device::cuda(0);
    using flashattn::Tensor;
    // q-shaped (q, out, dout, dq) and k-shaped (k, v, dk, dv) tensors, fixed-length or packed.
    auto qo = [&](uint16_t* p) {
      return varlen ? Tensor::contiguous(p, dtype, {total_q, c.heads, c.head_dim}, dev)
                    : Tensor::contiguous(p, dtype, {c.batch, c.seqlen_q, c.heads, c.head_dim}, dev);
    };
    auto kv = [&](uint16_t* p) {
      return varlen ? Tensor::contiguous(p, dtype, {total_k, c.heads_k, c.head_dim}, dev)
                    : Tensor::contiguous(p, dtype, {c.batch, c.seqlen, c.heads_k, c.head_dim}, dev);
    };
    const Tensor tq = qo(q), to = qo(o);
    const Tensor tl = varlen ? Tensor::contiguous(lse, flashattn::DType::f32, {c.heads, total_q}, dev)
                             : Tensor::contiguous(lse, flashattn::DType::f32, {c.batch, c.heads, c.seqlen_q}, dev);
    flashattn::VarlenLayout layout;
    if (varlen) {
      layout.cu_seqlens_q = layout.cu_seqlens_k =
          Tensor::contiguous(cu_dev, flashattn::DType::i32, {int64_t(cu.size())}, dev);
      layout.max_seqlen_q = layout.max_seqlen_k = c.seqlen;
    }
    const flashattn::VarlenLayout* lay = varlen ? &layout : nullptr;
    flashattn::Options opt;
    opt.causal = c.causal;
    opt.num_splits = c.num_splits;
    opt.deterministic = deterministic;
    opt.softcap = softcap;
    if (window_left >= 0 || window_right >= 0) {
      opt.window_left = window_left;
      opt.window_right = window_right == -2 ? (c.causal ? 0 : -1) : window_right;
    }
    if (alibi) opt.alibi_slopes = Tensor::contiguous(slopes, flashattn::DType::f32, {c.heads}, dev);
    opt.stream = stream;
    // One call on K/V copy j: the forward, or the backward of the forward run before timing.
    auto forward = [&](int j) {
      if (varlen) flashattn::forward_varlen(tq, kv(k[j]), kv(v[j]), to, tl, layout, opt);
      else flashattn::forward(tq, kv(k[j]), kv(v[j]), to, tl, opt);
    };
    auto run = [&](int j) {
      if (!backward) return forward(j);
      if (varlen)
        flashattn::backward_varlen(qo(d_o), tq, kv(k[j]), kv(v[j]), to, tl, qo(dq), kv(dk), kv(dv), layout, opt);
      else
        flashattn::backward(qo(d_o), tq, kv(k[j]), kv(v[j]), to, tl, qo(dq), kv(dk), kv(dv), opt);
    };
    std::vector<cudaEvent_t> ev(2 * iters);
    for (auto& e : ev) CHECK(cudaEventCreate(&e));
    std::string kernel;
    try {
      kernel = backward ? flashattn::cuda::backward_kernel(flashattn::core::check_backward(
                              qo(d_o), tq, kv(k[0]), kv(v[0]), to, tl, qo(dq), kv(dk), kv(dv), opt, lay))
                        : flashattn::cuda::forward_kernel(
                              flashattn::core::check_forward(tq, kv(k[0]), kv(v[0]), to, tl, opt, lay));
      if (backward) forward(0);  // out and lse
      for (int i = 0; i < warmup; ++i) run(i % copies);
      for (int i = 0; i < iters; ++i) {
        const int j = (warmup + i) % copies;
        CHECK(cudaEventRecord(ev[2 * i], stream));
        run(j);
        CHECK(cudaEventRecord(ev[2 * i + 1], stream));
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "flashattn-gpu-bench: %s\n", e.what());
      return 1;
    }
    CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
    const double med = median_of(ms), fastest = *std::min_element(ms.begin(), ms.end());
    // (query, key) pairs: the papers' convention (half of them under causal) unless a window
    // asks for the exact count; per document for varlen.
    const bool windowed = window_left >= 0 || window_right >= 0;
    auto pairs = [&](int64_t sq, int64_t sk) {
      return windowed ? visible_pairs(sq, sk, opt.window_left, opt.window_right)
                      : double(sq) * double(sk) / (c.causal ? 2 : 1);
    };
    double pair_count = 0;
    if (varlen)
      for (int d : docs) pair_count += pairs(d, d);
    else
      pair_count = c.batch * pairs(c.seqlen_q, c.seqlen);
    const double flops = 4.0 * c.heads * pair_count * c.head_dim * (backward ? 2.5 : 1.0);
    const double bytes = 2.0 * (2 * nq + 2 * nkv);  // q, out, k, v: 2 bytes an element
    std::printf("{\"batch\":%d,\"seqlen\":%d,\"seqlen_q\":%d,\"heads\":%d,\"heads_k\":%d,\"head_dim\":%d,"
                "\"causal\":%s,\"num_splits\":%d,\"dtype\":\"%s\",\"pass\":\"%s\",\"deterministic\":%s,\"kv_copies\":%d,"
                "\"docs\":%zu,\"total_q\":%lld,\"window\":[%d,%d],\"softcap\":%g,\"alibi\":%s,\"ms\":%.5f,\"ms_min\":%.5f,"
                "\"tflops\":%.2f,\"bytes\":%.0f,\"tbps\":%.4f,\"kernel\":\"%s\"}\n",
                c.batch, c.seqlen, c.seqlen_q, c.heads, c.heads_k, c.head_dim, c.causal ? "true" : "false",
                c.num_splits, bf16 ? "bf16" : "fp16", backward ? "bwd" : "fwd",
                backward && deterministic ? "true" : "false", copies, docs.size(), (long long)total_q,
                opt.window_left, opt.window_right, softcap, alibi ? "true" : "false", med, fastest,
                flops / (med * 1e-3) / 1e12, bytes, bytes / (med * 1e-3) / 1e12, kernel.c_str());
    std::fflush(stdout);
    for (auto& e : ev) CHECK(cudaEventDestroy(e));
    CHECK(cudaFree(q));
    for (int i = 0; i < copies; ++i) {
      CHECK(cudaFree(k[i]));
      CHECK(cudaFree(v[i]));
    }
    CHECK(cudaFree(o));
    CHECK(cudaFree(lse));
    for (uint16_t* p : {d_o, dq, dk, dv})
      if (p) CHECK(cudaFree(p));
    if (cu_dev) CHECK(cudaFree(cu_dev));
    if (slopes) CHECK(cudaFree(slopes));
  }
  CHECK(cudaStreamDestroy(stream));
  return 0;
}
