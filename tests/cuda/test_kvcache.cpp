// GPU tests of forward_kvcache (append + rotary kernel, paged K/V reads in the sm80 decode and
// forward kernels, cache rows, left padding, sinks) against the fp64 oracle (ref::forward_kvcache) on
// host copies; the FLASHATTN_CHECK_LENGTHS mode (a bad device-side value raises the named error and
// writes nothing); a paged decode step with appends captured in a CUDA graph and replayed.
// Without a usable sm80+ GPU every test skips itself.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "common/testing.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"

namespace fa_test {
namespace {

using flashattn::KVCache;

// A host buffer's device twin; views of the host buffer map onto it at the same offsets.
struct DeviceCopy {
  void* ptr = nullptr;
  const Buffer* host = nullptr;
  DeviceCopy() = default;
  explicit DeviceCopy(const Buffer& b) : host(&b) {
    EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(b.bytes(), 16)), cudaSuccess);
    upload();
  }
  ~DeviceCopy() { if (ptr) cudaFree(ptr); }
  DeviceCopy(const DeviceCopy&) = delete;
  void upload() { cudaMemcpy(ptr, host->data(), host->bytes(), cudaMemcpyHostToDevice); }
  void download(Buffer& into) const { cudaMemcpy(into.data(), ptr, into.bytes(), cudaMemcpyDeviceToHost); }
  Tensor on_device(const Tensor& host_view) const {
    Tensor t = host_view;
    t.data = static_cast<char*>(ptr) + (static_cast<const char*>(host_view.data) - static_cast<const char*>(host->data()));
    t.device = flashattn::Device::cuda(0);
    return t;
  }
};

struct KvCacheCase {
  std::string name;
  int batch = 3, sq = 1, new_tokens = 2, heads = 8, heads_k = 2, d = 128;
  int capacity = 300, page_size = 0;
  bool leftpad = false, batch_idx = false, sinks = false, causal = true;
  int rotary_dim = 0;
  bool interleaved = true;
  int num_splits = 0;
};

// Host problem (bf16), built like tests/cpu/test_kvcache.cpp's.
struct Problem {
  KvCacheCase c;
  int rows = 0, pages_per_seq = 0, num_pages = 0, capacity = 0;
  Buffer bq, bkn, bvn, bkc, bvc, bseq, bidx, blp, bpt, bcos, bsin, bsink, bout, blse;
  Tensor q, k_new, v_new, out, lse;
  KVCache cache;
  Options opt;
  std::vector<int32_t> seqlens;

  explicit Problem(const KvCacheCase& gc) : c(gc) {
    Rng rng(test_seed(c.name));
    const DType t = DType::bf16;
    rows = c.batch_idx ? c.batch + 2 : c.batch;
    if (c.page_size) {
      pages_per_seq = (c.capacity + c.page_size - 1) / c.page_size;
      capacity = pages_per_seq * c.page_size;
      num_pages = rows * pages_per_seq + 1;
    } else {
      capacity = c.capacity;
    }
    auto make = [&](Buffer& b, DType dt, std::vector<int64_t> shape, bool fill) {
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      b = Buffer(dt, n);
      Tensor v = view(b, shape);
      if (fill) fill_normal(v, rng);
      return v;
    };
    q = make(bq, t, {c.batch, c.sq, c.heads, c.d}, true);
    k_new = make(bkn, t, {c.batch, c.new_tokens, c.heads_k, c.d}, true);
    v_new = make(bvn, t, {c.batch, c.new_tokens, c.heads_k, c.d}, true);
    const int64_t r0 = c.page_size ? num_pages : rows, r1 = c.page_size ? c.page_size : capacity;
    cache.k_cache = make(bkc, t, {r0, r1, c.heads_k, c.d}, true);
    cache.v_cache = make(bvc, t, {r0, r1, c.heads_k, c.d}, true);
    out = make(bout, t, {c.batch, c.sq, c.heads, c.d}, false);
    lse = make(blse, DType::f32, {c.batch, c.heads, c.sq}, false);
    seqlens.resize(c.batch);
    cache.cache_seqlens = make(bseq, DType::i32, {c.batch}, false);
    for (int b = 0; b < c.batch; ++b) seqlens[b] = b == 0 ? capacity - c.new_tokens : int(rng.next() % uint64_t(capacity - c.new_tokens));
    std::copy(seqlens.begin(), seqlens.end(), static_cast<int32_t*>(bseq.data()));
    std::vector<int32_t> idx(c.batch);
    std::iota(idx.begin(), idx.end(), 0);
    if (c.batch_idx) {
      std::vector<int32_t> all(rows);
      std::iota(all.begin(), all.end(), 0);
      for (int i = rows - 1; i > 0; --i) std::swap(all[i], all[rng.next() % uint64_t(i + 1)]);
      std::copy(all.begin(), all.begin() + c.batch, idx.begin());
      cache.cache_batch_idx = make(bidx, DType::i32, {c.batch}, false);
      std::copy(idx.begin(), idx.end(), static_cast<int32_t*>(bidx.data()));
    }
    if (c.leftpad) {
      cache.cache_leftpad = make(blp, DType::i32, {c.batch}, false);
      for (int b = 0; b < c.batch; ++b) static_cast<int32_t*>(blp.data())[b] = int(rng.next() % uint64_t(seqlens[b] + 1));
    }
    if (c.page_size) {
      cache.page_table = make(bpt, DType::i32, {rows, pages_per_seq}, false);
      std::vector<int32_t> pages(num_pages);
      std::iota(pages.begin(), pages.end(), 0);
      for (int i = num_pages - 1; i > 0; --i) std::swap(pages[i], pages[rng.next() % uint64_t(i + 1)]);
      std::copy(pages.begin(), pages.begin() + rows * pages_per_seq, static_cast<int32_t*>(bpt.data()));
    }
    if (c.rotary_dim) {
      cache.rotary_cos = make(bcos, t, {capacity, c.rotary_dim / 2}, false);
      cache.rotary_sin = make(bsin, t, {capacity, c.rotary_dim / 2}, false);
      for (int pos = 0; pos < capacity; ++pos)
        for (int i = 0; i < c.rotary_dim / 2; ++i) {
          const double th = pos * std::pow(10000.0, -2.0 * i / c.rotary_dim);
          store(*cache.rotary_cos, pos * (c.rotary_dim / 2) + i, std::cos(th));
          store(*cache.rotary_sin, pos * (c.rotary_dim / 2) + i, std::sin(th));
        }
      cache.rotary_interleaved = c.interleaved;
    }
    if (c.sinks) {
      opt.sinks = make(bsink, DType::f32, {c.heads}, false);
      fill_normal(*opt.sinks, rng, 2.0);
    }
    opt.causal = c.causal;
    opt.num_splits = c.num_splits;
  }
};

// Every index/table buffer of a problem on the device, and the device views of the call.
struct OnDevice {
  std::vector<std::unique_ptr<DeviceCopy>> copies;
  Tensor q, k_new, v_new, out, lse;
  KVCache cache;
  Options opt;
  DeviceCopy* kc = nullptr;
  DeviceCopy* vc = nullptr;

  explicit OnDevice(Problem& p) {
    auto dev = [&](Buffer& b, const Tensor& v) {
      copies.push_back(std::make_unique<DeviceCopy>(b));
      return copies.back()->on_device(v);
    };
    auto dev_opt = [&](Buffer& b, const std::optional<Tensor>& v) -> std::optional<Tensor> {
      if (!v) return std::nullopt;
      return dev(b, *v);
    };
    q = dev(p.bq, p.q);
    k_new = dev(p.bkn, p.k_new);
    v_new = dev(p.bvn, p.v_new);
    out = dev(p.bout, p.out);
    lse = dev(p.blse, p.lse);
    cache = p.cache;
    cache.k_cache = dev(p.bkc, p.cache.k_cache);
    kc = copies.back().get();
    cache.v_cache = dev(p.bvc, p.cache.v_cache);
    vc = copies.back().get();
    cache.cache_seqlens = dev_opt(p.bseq, p.cache.cache_seqlens);
    cache.cache_batch_idx = dev_opt(p.bidx, p.cache.cache_batch_idx);
    cache.cache_leftpad = dev_opt(p.blp, p.cache.cache_leftpad);
    cache.page_table = dev_opt(p.bpt, p.cache.page_table);
    cache.rotary_cos = dev_opt(p.bcos, p.cache.rotary_cos);
    cache.rotary_sin = dev_opt(p.bsin, p.cache.rotary_sin);
    opt = p.opt;
    opt.sinks = dev_opt(p.bsink, p.opt.sinks);
  }
};

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) if (std::isfinite(x)) m = std::max(m, std::abs(x));
  return m;
}

// bf16: stored values within a rounding of the oracle's; outputs within 2e-2 of max|ref|.
void expect_close(const char* what, const std::vector<double>& ours, const std::vector<double>& ref, double rel) {
  ASSERT_EQ(ours.size(), ref.size()) << what;
  const double tol = rel * std::max(1.0, max_abs(ref));
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i])) {
      EXPECT_EQ(ours[i], ref[i]) << what << " at " << i;
      continue;
    }
    worst = std::max(worst, std::abs(ours[i] - ref[i]));
  }
  EXPECT_LE(worst, tol) << what;
}

std::vector<KvCacheCase> cases() {
  std::vector<KvCacheCase> v;
  auto add = [&](std::string n, auto&& f) { KvCacheCase c; c.name = n; f(c); v.push_back(c); };
  add("dense_append_decode", [](KvCacheCase&) {});
  add("dense_batch_idx_leftpad_rotary", [](KvCacheCase& c) { c.batch_idx = true, c.leftpad = true, c.rotary_dim = 128; });
  add("paged1_decode", [](KvCacheCase& c) { c.page_size = 1; });
  add("paged16_decode_rotary_neox", [](KvCacheCase& c) { c.page_size = 16, c.rotary_dim = 64, c.interleaved = false; });
  add("paged256_decode_split", [](KvCacheCase& c) { c.page_size = 256, c.capacity = 1000, c.num_splits = 4; });
  add("paged16_batch_idx_leftpad_sinks", [](KvCacheCase& c) { c.page_size = 16, c.batch_idx = true, c.leftpad = true, c.sinks = true; });
  add("paged16_chunk_fwd_kernel", [](KvCacheCase& c) { c.page_size = 16, c.sq = 40, c.new_tokens = 40, c.heads_k = 8; });
  add("paged3_chunk_fwd_kernel_rotary", [](KvCacheCase& c) { c.page_size = 3, c.sq = 33, c.new_tokens = 33, c.heads_k = 8, c.rotary_dim = 32; });
  add("dense_sinks_decode_split", [](KvCacheCase& c) { c.sinks = true, c.capacity = 2000, c.num_splits = 3; });
  return v;
}

class CudaKVCache : public ::testing::TestWithParam<KvCacheCase> {};

TEST_P(CudaKVCache, MatchesOracle) {
  SKIP_WITHOUT_GPU();
  Problem p(GetParam());
  const auto ref = ref::forward_kvcache(p.q, p.k_new, p.v_new, p.cache, p.opt);
  OnDevice d(p);
  ASSERT_TRUE(runs("forward_kvcache", [&] { flashattn::forward_kvcache(d.q, d.k_new, d.v_new, d.cache, d.out, d.lse, d.opt); }));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (auto& c : d.copies) c->download(const_cast<Buffer&>(*c->host));
  expect_close("k_cache", to_dense(p.cache.k_cache), ref.k_cache, 1.0 / 128);
  EXPECT_TRUE(to_dense(p.cache.v_cache) == ref.v_cache) << "v_cache";
  expect_close("out", to_dense(p.out), ref.out, 2e-2);
  expect_close("lse", to_dense(p.lse), ref.lse, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaKVCache, ::testing::ValuesIn(cases()), [](const auto& i) { return i.param.name; });

// FLASHATTN_CHECK_LENGTHS / set_check_lengths: device-side values are checked with one copy and a bad
// one raises the named error before anything is written.
TEST(CudaCheckLengths, BadDeviceValuesRaiseBeforeAnyWrite) {
  SKIP_WITHOUT_GPU();
  KvCacheCase c;
  c.name = "check";
  c.page_size = 16;
  Problem p(c);
  static_cast<int32_t*>(p.bseq.data())[1] = p.capacity;  // + 2 new tokens: past the cache
  OnDevice d(p);
  const bool before_mode = flashattn::check_lengths();
  flashattn::set_check_lengths(true);
  try {
    flashattn::forward_kvcache(d.q, d.k_new, d.v_new, d.cache, d.out, d.lse, d.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "cache_seqlens") << e.what();
  }
  static_cast<int32_t*>(p.bseq.data())[1] = 0;
  static_cast<int32_t*>(p.bpt.data())[0] = p.num_pages;  // sequence 0 is full: its first page is in use
  for (auto& cp : d.copies) cp->upload();
  try {
    flashattn::forward_kvcache(d.q, d.k_new, d.v_new, d.cache, d.out, d.lse, d.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "page_table") << e.what();
  }
  flashattn::set_check_lengths(before_mode);
  Buffer k_after(DType::bf16, p.bkc.numel());
  d.kc->download(k_after);
  EXPECT_TRUE(k_after.snapshot() == p.bkc.snapshot()) << "k_cache was written by a rejected call";
}

// A paged decode step with appends (rotary, sinks) captured in a CUDA graph and replayed equals the
// eager call: no host synchronisation and no allocation outside the graph's own memory nodes.
TEST(CudaKVCacheGraph, CapturedPagedDecodeStepReplays) {
  SKIP_WITHOUT_GPU();
  KvCacheCase c;
  c.name = "graph";
  c.page_size = 16;
  c.rotary_dim = 128;
  c.sinks = true;
  c.num_splits = 4;
  c.capacity = 1024;
  Problem p(c);
  OnDevice eager(p), captured(p);
  ASSERT_TRUE(runs("eager", [&] {
    flashattn::forward_kvcache(eager.q, eager.k_new, eager.v_new, eager.cache, eager.out, eager.lse, eager.opt);
  }));
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  captured.opt.stream = stream;
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const bool ok = runs("capture", [&] {
    flashattn::forward_kvcache(captured.q, captured.k_new, captured.v_new, captured.cache, captured.out, captured.lse,
                               captured.opt);
  });
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(ok);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Buffer a(DType::bf16, p.bout.numel()), b(DType::bf16, p.bout.numel());
  eager.copies[3]->download(a);
  captured.copies[3]->download(b);
  EXPECT_TRUE(a.snapshot() == b.snapshot()) << "replayed output differs from the eager call";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace fa_test
