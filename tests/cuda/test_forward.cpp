// GPU tests of the CUDA backend: flashattn::forward / forward_varlen / merge on device tensors,
// checked against the fp64 oracle (ref::forward) on host copies with the docs/DESIGN.md §5 rule
//   max|ours - ref| <= 2 * max|base - ref| + atol_rel * max|ref|
// where base = the standard attention (flashattn::standard, materialised S/P rounded to the
// input dtype) on the CPU, and atol_rel = 1e-2 (bf16) / 1e-3 (fp16): the rounding of the stored
// result alone, with a factor 2 (the same constants as the CPU suite's tests/common).
//
// Every output buffer is poisoned (NaN) with guard bands around it, and strided layouts leave
// gaps that must stay untouched. Without a usable sm80+ GPU every test is skipped (CI).
//
// On an H100 the grid runs the sm90 kernel wherever it covers a case and the sm80 kernel
// elsewhere; FLASHATTN_CUDA_FORWARD=sm80 in the environment runs the whole grid on sm80 (the
// device script does both). The summary line counts the cases each kernel family ran, and
// CudaDispatch checks which kernel the dispatch picks.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing.h"
#include "core/half.h"
#include "core/knobs.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "cuda/split_kv.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"
#include "ref/standard.h"

namespace {

using flashattn::Device;
using flashattn::DType;
using flashattn::Options;
using flashattn::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();

#define CUDA_OK(call)                                                                   \
  do {                                                                                  \
    const cudaError_t e_ = (call);                                                      \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_);              \
  } while (0)

bool gpu_present() {
  static const bool ok = flashattn::cuda_available();
  return ok;
}

#define SKIP_WITHOUT_GPU() \
  if (!gpu_present()) GTEST_SKIP() << "no sm80+ CUDA device: GPU tests skipped"

// The device is an sm_90 GPU and this build has the sm90a forward with head dims 64 and 128 (the
// CMake file defines FLASHATTN_TEST_HAVE_SM90 then): covered calls must run on it.
bool expect_sm90() {
#if FLASHATTN_TEST_HAVE_SM90
  int major = 0, minor = 0;
  if (!gpu_present() || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

using fa_test::ScopedKnobs;
using flashattn::KernelChoice;
using flashattn::Knobs;

uint64_t seed_for(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ uint8_t(c)) * 1099511628211ull;
  if (const char* s = std::getenv("FLASHATTN_TEST_SEED")) h ^= std::strtoull(s, nullptr, 10);
  return h;
}

// ---- device buffers with guard bands --------------------------------------------------------
// A device allocation of `numel` elements of `esize` bytes plus kGuard bytes on both sides. All
// of it starts as `fill`; check_outside() verifies that only the given offsets changed.
class DeviceBuffer {
 public:
  static constexpr size_t kGuard = 512;  // bytes, a multiple of 16 (keeps data 16-byte aligned)

  DeviceBuffer(size_t esize, int64_t numel) : esize_(esize), numel_(numel) {
    bytes_ = kGuard * 2 + esize * size_t(std::max<int64_t>(numel, 1));
    if (cudaMalloc(&raw_, bytes_) != cudaSuccess) raw_ = nullptr;
  }
  ~DeviceBuffer() {
    if (raw_) cudaFree(raw_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  bool ok() const { return raw_ != nullptr; }
  void* data() const { return static_cast<char*>(raw_) + kGuard; }
  int64_t numel() const { return numel_; }

  // The whole allocation (guards too) as host bytes / from host bytes.
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> h(bytes_);
    if (cudaMemcpy(h.data(), raw_, bytes_, cudaMemcpyDeviceToHost) != cudaSuccess) h.clear();
    return h;
  }
  bool upload(const std::vector<uint8_t>& h) const {
    return h.size() == bytes_ && cudaMemcpy(raw_, h.data(), bytes_, cudaMemcpyHostToDevice) == cudaSuccess;
  }
  // Every element (and the guards) set to the element bit pattern `pattern`.
  std::vector<uint8_t> pattern_bytes(uint32_t pattern) const {
    std::vector<uint8_t> h(bytes_);
    for (size_t i = 0; i < bytes_; i += esize_) std::memcpy(&h[i], &pattern, std::min(esize_, bytes_ - i));
    return h;
  }
  size_t element_byte(int64_t offset) const { return kGuard + size_t(offset) * esize_; }
  size_t esize() const { return esize_; }

 private:
  size_t esize_;
  int64_t numel_;
  size_t bytes_ = 0;
  void* raw_ = nullptr;
};

// ---- layouts --------------------------------------------------------------------------------
enum class Layout { dense, bhsd };  // bhsd: (b, h, s, d + 8) in memory, viewed as (b, s, h, d)

struct Shape4 {
  int64_t b, s, h, d;
};

// Strides (in elements) and the allocation size of a (b, s, h, d) tensor in `layout`.
struct Placed {
  std::vector<int64_t> shape, stride;
  int64_t numel = 0;
};

Placed place(Shape4 x, Layout layout, bool varlen) {
  Placed p;
  if (layout == Layout::dense) {
    if (varlen) {
      p.shape = {x.s, x.h, x.d};
      p.stride = {x.h * x.d, x.d, 1};
    } else {
      p.shape = {x.b, x.s, x.h, x.d};
      p.stride = {x.s * x.h * x.d, x.h * x.d, x.d, 1};
    }
    p.numel = x.b * x.s * x.h * x.d;
    return p;
  }
  const int64_t dp = x.d + 8;  // a gap of 8 elements after each row: must stay untouched
  if (varlen) {
    p.shape = {x.s, x.h, x.d};
    p.stride = {dp, x.s * dp, 1};
  } else {
    p.shape = {x.b, x.s, x.h, x.d};
    p.stride = {x.h * x.s * dp, dp, x.s * dp, 1};
  }
  p.numel = x.b * x.h * x.s * dp;
  return p;
}

Tensor make_tensor(void* data, DType t, const Placed& p, Device dev) {
  Tensor x;
  x.data = data;
  x.dtype = t;
  x.device = dev;
  x.rank = int(p.shape.size());
  for (int i = 0; i < x.rank; ++i) {
    x.shape[i] = p.shape[i];
    x.stride[i] = p.stride[i];
  }
  return x;
}

// Logical (row-major over shape) -> element offset.
template <typename Fn>
void for_each_offset(const Placed& p, Fn fn) {
  const int r = int(p.shape.size());
  std::vector<int64_t> idx(r, 0);
  int64_t total = 1;
  for (auto s : p.shape) total *= s;
  for (int64_t n = 0; n < total; ++n) {
    int64_t off = 0;
    for (int i = 0; i < r; ++i) off += idx[i] * p.stride[i];
    fn(n, off);
    for (int i = r - 1; i >= 0; --i) {
      if (++idx[i] < p.shape[i]) break;
      idx[i] = 0;
    }
  }
}

uint16_t to_bits(DType t, float v) {
  return t == DType::bf16 ? flashattn::float_to_bf16(v) : flashattn::float_to_f16(v);
}
double from_bits(DType t, uint16_t b) {
  return t == DType::bf16 ? flashattn::bf16_to_float(b) : flashattn::f16_to_float(b);
}

// ---- comparison -------------------------------------------------------------------------------
struct Err {
  double max_abs = 0, max_ref = 0;
  int64_t worst = -1, nan = 0;
};

Err error_of(const std::vector<double>& a, const std::vector<double>& ref) {
  Err e;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(ref[i])) {  // -inf LSE: must match exactly
      if (a[i] != ref[i]) {
        e.max_abs = kInf;
        e.worst = int64_t(i);
        ++e.nan;
      }
      continue;
    }
    e.max_ref = std::max(e.max_ref, std::abs(ref[i]));
    const double d = std::abs(a[i] - ref[i]);
    if (!std::isfinite(a[i])) {
      ++e.nan;
      e.max_abs = kInf;
      e.worst = int64_t(i);
    } else if (d > e.max_abs) {
      e.max_abs = d;
      e.worst = int64_t(i);
    }
  }
  return e;
}

// Largest error seen per (kind, dtype), printed at the end for the report.
struct Summary {
  double out_err[2] = {0, 0}, out_bound[2] = {0, 0}, lse_err[2] = {0, 0};
  int checks = 0;
  int sm90_cases = 0, sm80_cases = 0;  // grid cases run by each kernel family
} g_summary;

::testing::AssertionResult within(const std::string& what, DType t, const std::vector<double>& ours,
                                  const std::vector<double>& base, const std::vector<double>& ref) {
  const Err e = error_of(ours, ref);
  const Err eb = error_of(base, ref);
  const double atol = (t == DType::bf16 ? 1e-2 : 1e-3) * e.max_ref;
  const double bound = 2 * eb.max_abs + atol;
  const int k = t == DType::bf16 ? 0 : 1;
  if (what == "out") {
    g_summary.out_err[k] = std::max(g_summary.out_err[k], e.max_abs);
    g_summary.out_bound[k] = std::max(g_summary.out_bound[k], bound);
  } else {
    g_summary.lse_err[k] = std::max(g_summary.lse_err[k], e.max_abs);
  }
  ++g_summary.checks;
  std::ostringstream os;
  os << what << ": max|ours-ref| = " << e.max_abs << " (at " << e.worst << ": ours "
     << (e.worst >= 0 ? ours[e.worst] : 0) << ", ref " << (e.worst >= 0 ? ref[e.worst] : 0)
     << "), bound 2*" << eb.max_abs << " + " << atol << " = " << bound << ", max|ref| " << e.max_ref
     << ", non-finite/mismatched -inf " << e.nan;
  if (std::getenv("FLASHATTN_TEST_VERBOSE")) std::printf("  %s\n", os.str().c_str());
  if (e.nan == 0 && e.max_abs <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << os.str();
}

// ---- one attention problem ----------------------------------------------------------------
struct Case {
  std::string name;
  int batch = 1, sq = 1, sk = 1, heads = 1, heads_k = 1, d = 64, dv = 0;
  DType dtype = DType::bf16;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0;
  bool alibi = false;
  std::optional<float> scale;
  bool small_tiles = false;  // FLASHATTN_CUDA_SMALL_TILES=1: the sm80 (163 KB smem) tiles on sm90 too
  int num_splits = 0;        // options.num_splits: 0 = heuristic, 1 = never split, N = N key splits
  bool decode_kernel = true; // false: FLASHATTN_CUDA_DECODE=0, decode shapes go to the main kernel
  KernelChoice force = KernelChoice::kAuto;  // FLASHATTN_CUDA_FORWARD for this case
  int sm90_ctas = 0;         // FLASHATTN_SM90_MAX_CTAS: a small persistent grid, many tiles per CTA
  Layout layout = Layout::dense;
  std::vector<int> lens_q, lens_k;  // varlen when non-empty (batch = lens_q.size())
  std::vector<int32_t> used_k;      // options.seqused_k (keys used per sequence) when non-empty

  int head_dim_v() const { return dv ? dv : d; }
  bool varlen() const { return !lens_q.empty(); }
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

class ForwardRun {
 public:
  explicit ForwardRun(const Case& c) : c_(c) {}

  void run() {
    const Case& c = c_;
    const bool varlen = c.varlen();
    const int dv = c.head_dim_v();
    std::mt19937_64 rng(seed_for(c.name));
    std::normal_distribution<double> normal(0.0, 1.0);

    // Logical sizes. Varlen: packed rows = sum of lengths plus 3 rows owned by no sequence.
    int64_t rows_q = int64_t(c.batch) * c.sq, rows_k = int64_t(c.batch) * c.sk;
    std::vector<int32_t> cu_q{0}, cu_k{0};
    if (varlen) {
      for (size_t i = 0; i < c.lens_q.size(); ++i) {
        cu_q.push_back(cu_q.back() + c.lens_q[i]);
        cu_k.push_back(cu_k.back() + c.lens_k[i]);
      }
      rows_q = cu_q.back() + 3;
      rows_k = cu_k.back() + 3;
    }
    const int64_t bq = varlen ? 1 : c.batch, sq = varlen ? rows_q : c.sq, sk = varlen ? rows_k : c.sk;
    const Placed pq = place({bq, sq, c.heads, c.d}, c.layout, varlen);
    const Placed pk = place({bq, sk, c.heads_k, c.d}, c.layout, varlen);
    const Placed pv = place({bq, sk, c.heads_k, dv}, c.layout, varlen);
    const Placed po = place({bq, sq, c.heads, dv}, c.layout, varlen);
    Placed pl;  // lse: (b, h, sq) or (h, total_q), dense
    if (varlen) {
      pl.shape = {c.heads, rows_q};
      pl.stride = {rows_q, 1};
      pl.numel = c.heads * rows_q;
    } else {
      pl.shape = {c.batch, c.heads, c.sq};
      pl.stride = {int64_t(c.heads) * c.sq, c.sq, 1};
      pl.numel = int64_t(c.batch) * c.heads * c.sq;
    }
    const Placed dq = place({bq, sq, c.heads, c.d}, Layout::dense, varlen);
    const Placed dk = place({bq, sk, c.heads_k, c.d}, Layout::dense, varlen);
    const Placed dvp = place({bq, sk, c.heads_k, dv}, Layout::dense, varlen);
    const Placed dop = place({bq, sq, c.heads, dv}, Layout::dense, varlen);

    // Host inputs (dense, the dtype's bits), fresh random values; never zeros.
    auto random_bits = [&](int64_t n) {
      std::vector<uint16_t> v(std::max<int64_t>(n, 1));  // never empty: a view of no keys still needs data
      for (auto& x : v) x = to_bits(c.dtype, float(normal(rng)));
      return v;
    };
    hq_ = random_bits(dq.numel);
    hk_ = random_bits(dk.numel);
    hv_ = random_bits(dvp.numel);
    std::vector<float> slopes;
    if (c.alibi) {
      for (int h = 0; h < c.heads; ++h) slopes.push_back(float(std::pow(2.0, -8.0 * (h + 1) / c.heads)));
    }

    // Device copies in the case's layout; gaps hold a pattern that must survive.
    const uint32_t in_gap = c.dtype == DType::bf16 ? 0x3F80u : 0x3C00u;  // 1.0: a wrong read shows
    DeviceBuffer gq(2, pq.numel), gk(2, pk.numel), gv(2, pv.numel), go(2, po.numel), gl(4, pl.numel);
    DeviceBuffer gcu_q(4, int64_t(cu_q.size())), gcu_k(4, int64_t(cu_k.size())), gslopes(4, c.heads);
    ASSERT_TRUE(gq.ok() && gk.ok() && gv.ok() && go.ok() && gl.ok() && gcu_q.ok() && gcu_k.ok() && gslopes.ok());
    auto upload = [&](DeviceBuffer& g, const Placed& p, const std::vector<uint16_t>& dense) {
      auto bytes = g.pattern_bytes(in_gap);
      for_each_offset(p, [&](int64_t n, int64_t off) { std::memcpy(&bytes[g.element_byte(off)], &dense[n], 2); });
      return g.upload(bytes);
    };
    ASSERT_TRUE(upload(gq, pq, hq_));
    ASSERT_TRUE(upload(gk, pk, hk_));
    ASSERT_TRUE(upload(gv, pv, hv_));
    CUDA_OK(cudaMemcpy(gcu_q.data(), cu_q.data(), cu_q.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(gcu_k.data(), cu_k.data(), cu_k.size() * 4, cudaMemcpyHostToDevice));
    if (c.alibi) CUDA_OK(cudaMemcpy(gslopes.data(), slopes.data(), slopes.size() * 4, cudaMemcpyHostToDevice));
    DeviceBuffer gused(4, int64_t(c.used_k.size()));
    ASSERT_TRUE(gused.ok());
    if (!c.used_k.empty())
      CUDA_OK(cudaMemcpy(gused.data(), c.used_k.data(), c.used_k.size() * 4, cudaMemcpyHostToDevice));

    // Poison: outputs NaN everywhere (gaps and guards included).
    const uint32_t nan16 = 0x7FC1u, nan32 = 0x7FC00001u;
    const auto out_before = go.pattern_bytes(nan16), lse_before = gl.pattern_bytes(nan32);
    ASSERT_TRUE(go.upload(out_before));
    ASSERT_TRUE(gl.upload(lse_before));

    Options opt;
    opt.causal = c.causal;
    opt.window_left = c.wl;
    opt.window_right = c.wr;
    opt.softcap = c.softcap;
    opt.softmax_scale = c.scale;
    opt.num_splits = c.num_splits;
    const Device dev = Device::cuda(0);
    const Tensor tq = make_tensor(gq.data(), c.dtype, pq, dev);
    const Tensor tk = make_tensor(gk.data(), c.dtype, pk, dev);
    const Tensor tv = make_tensor(gv.data(), c.dtype, pv, dev);
    const Tensor to = make_tensor(go.data(), c.dtype, po, dev);
    const Tensor tl = make_tensor(gl.data(), DType::f32, pl, dev);
    if (c.alibi) opt.alibi_slopes = Tensor::contiguous(gslopes.data(), DType::f32, {c.heads}, dev);
    if (!c.used_k.empty())
      opt.seqused_k = Tensor::contiguous(gused.data(), DType::i32, {int64_t(c.used_k.size())}, dev);
    flashattn::VarlenLayout vl;
    if (varlen) {
      vl.cu_seqlens_q = Tensor::contiguous(gcu_q.data(), DType::i32, {int64_t(cu_q.size())}, dev);
      vl.cu_seqlens_k = Tensor::contiguous(gcu_k.data(), DType::i32, {int64_t(cu_k.size())}, dev);
      vl.max_seqlen_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
      vl.max_seqlen_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
    }
    std::string kernel;
    {
      ScopedKnobs knobs([&](Knobs& k) {
        if (c.small_tiles) k.cuda_small_tiles = true;
        if (c.force != KernelChoice::kAuto) k.cuda_forward = c.force;
        if (c.sm90_ctas > 0) k.sm90_max_ctas = c.sm90_ctas;
        if (!c.decode_kernel) k.cuda_decode = false;
      });
      try {
        kernel = flashattn::cuda::forward_kernel(
            flashattn::core::check_forward(tq, tk, tv, to, tl, opt, varlen ? &vl : nullptr));
        if (varlen)
          flashattn::forward_varlen(tq, tk, tv, to, tl, vl, opt);
        else
          flashattn::forward(tq, tk, tv, to, tl, opt);
      } catch (const std::exception& e) {
        FAIL() << "forward threw: " << e.what();
      }
    }
    CUDA_OK(cudaDeviceSynchronize());
    const bool ran_sm90 = kernel.rfind("flash_fwd_sm90", 0) == 0;
    ++(ran_sm90 ? g_summary.sm90_cases : g_summary.sm80_cases);
    if (std::getenv("FLASHATTN_TEST_VERBOSE")) std::printf("  kernel: %s\n", kernel.c_str());

    // Read back; everything outside the views must be as poisoned.
    const auto out_after = go.download(), lse_after = gl.download();
    ASSERT_FALSE(out_after.empty());
    ASSERT_FALSE(lse_after.empty());
    std::vector<uint8_t> touched_o(out_after.size(), 0), touched_l(lse_after.size(), 0);
    // Varlen rows past the last sequence are owned by nobody: they must stay poisoned too.
    auto owned_q = [&](int64_t packed_row) { return !varlen || packed_row < cu_q.back(); };
    std::vector<double> ours_out, ours_lse;
    for_each_offset(po, [&](int64_t n, int64_t off) {
      const int64_t row = n / (int64_t(c.heads) * dv);  // packed row (varlen) or b * sq + i
      if (!owned_q(row)) return;
      uint16_t bits;
      std::memcpy(&bits, &out_after[go.element_byte(off)], 2);
      for (size_t k = 0; k < 2; ++k) touched_o[go.element_byte(off) + k] = 1;
      ours_out.push_back(from_bits(c.dtype, bits));
    });
    for_each_offset(pl, [&](int64_t n, int64_t off) {
      if (!owned_q(varlen ? n % rows_q : 0)) return;
      float f;
      std::memcpy(&f, &lse_after[gl.element_byte(off)], 4);
      for (size_t k = 0; k < 4; ++k) touched_l[gl.element_byte(off) + k] = 1;
      ours_lse.push_back(f);
    });
    int64_t stray_o = 0, stray_l = 0;
    for (size_t i = 0; i < out_after.size(); ++i) stray_o += !touched_o[i] && out_after[i] != out_before[i];
    for (size_t i = 0; i < lse_after.size(); ++i) stray_l += !touched_l[i] && lse_after[i] != lse_before[i];
    EXPECT_EQ(stray_o, 0) << "bytes of out written outside the output view (gaps, guards, unowned rows); kernel: "
                          << kernel;
    EXPECT_EQ(stray_l, 0) << "bytes of lse written outside the lse view; kernel: " << kernel;

    // The oracle and the same-precision baseline, on host copies (dense).
    const Device cpu = Device::cpu();
    Tensor hq = make_tensor(hq_.data(), c.dtype, dq, cpu), hk = make_tensor(hk_.data(), c.dtype, dk, cpu),
           hv = make_tensor(hv_.data(), c.dtype, dvp, cpu);
    Options hopt = opt;
    if (c.alibi) hopt.alibi_slopes = Tensor::contiguous(slopes.data(), DType::f32, {c.heads}, cpu);
    std::vector<int32_t> used_k = c.used_k;
    if (!used_k.empty()) hopt.seqused_k = Tensor::contiguous(used_k.data(), DType::i32, {int64_t(used_k.size())}, cpu);
    flashattn::VarlenLayout hvl;
    if (varlen) {
      hvl.cu_seqlens_q = Tensor::contiguous(cu_q.data(), DType::i32, {int64_t(cu_q.size())}, cpu);
      hvl.cu_seqlens_k = Tensor::contiguous(cu_k.data(), DType::i32, {int64_t(cu_k.size())}, cpu);
      hvl.max_seqlen_q = vl.max_seqlen_q;
      hvl.max_seqlen_k = vl.max_seqlen_k;
    }
    const auto ref = flashattn::ref::forward(hq, hk, hv, hopt, varlen ? &hvl : nullptr);

    // Restrict the oracle to owned rows (varlen: drop the 3 unowned packed rows).
    std::vector<double> ref_out, ref_lse;
    const int64_t used_q = varlen ? cu_q.back() : rows_q;
    ref_out.assign(ref.out.begin(), ref.out.begin() + used_q * c.heads * dv);
    if (varlen) {
      for (int h = 0; h < c.heads; ++h)
        for (int64_t r = 0; r < used_q; ++r) ref_lse.push_back(ref.lse[h * rows_q + r]);
    } else {
      ref_lse = ref.lse;
    }

    // Baseline: standard attention per sequence (varlen, or seqused_k: on the used keys' views)
    // or for the whole batch.
    std::vector<double> base_out(ref_out.size(), 0.0), base_lse(ref_lse.size(), -kInf);
    Options sopt = hopt;
    sopt.seqused_k.reset();
    const bool per_sequence = varlen || !c.used_k.empty();
    auto run_standard = [&](int64_t q_row0, int64_t k_row0, int len_q, int len_k, int b_fixed) {
      if (len_q == 0 || len_k == 0) return;  // O = 0, LSE = -inf: what base_* already hold
      const int64_t nb = per_sequence ? 1 : c.batch;
      std::vector<uint16_t> so(nb * len_q * c.heads * dv);
      std::vector<float> sl(nb * c.heads * len_q);
      Tensor sq_t = Tensor::strided(hq_.data() + q_row0 * c.heads * c.d, c.dtype, {nb, len_q, c.heads, c.d},
                                    {int64_t(len_q) * c.heads * c.d, int64_t(c.heads) * c.d, c.d, 1});
      Tensor sk_t = Tensor::strided(hk_.data() + k_row0 * c.heads_k * c.d, c.dtype, {nb, len_k, c.heads_k, c.d},
                                    {int64_t(len_k) * c.heads_k * c.d, int64_t(c.heads_k) * c.d, c.d, 1});
      Tensor sv_t = Tensor::strided(hv_.data() + k_row0 * c.heads_k * dv, c.dtype, {nb, len_k, c.heads_k, dv},
                                    {int64_t(len_k) * c.heads_k * dv, int64_t(c.heads_k) * dv, dv, 1});
      Tensor so_t = Tensor::contiguous(so.data(), c.dtype, {nb, len_q, c.heads, dv});
      Tensor sl_t = Tensor::contiguous(sl.data(), DType::f32, {nb, c.heads, len_q});
      flashattn::standard::forward(sq_t, sk_t, sv_t, so_t, sl_t, sopt);
      for (int64_t bb = 0; bb < nb; ++bb)
        for (int64_t i = 0; i < len_q; ++i)
          for (int h = 0; h < c.heads; ++h) {
            const int64_t b_abs = per_sequence ? b_fixed : bb;  // the sequence in the fixed layout
            const int64_t row = varlen ? q_row0 + i : b_abs * c.sq + i;
            for (int d = 0; d < dv; ++d)
              base_out[(row * c.heads + h) * dv + d] = from_bits(c.dtype, so[((bb * len_q + i) * c.heads + h) * dv + d]);
            const double l = sl[(bb * c.heads + h) * len_q + i];
            if (varlen)
              base_lse[h * used_q + row] = l;
            else
              base_lse[(b_abs * c.heads + h) * c.sq + i] = l;
          }
    };
    try {
      if (varlen) {
        for (size_t b = 0; b < c.lens_q.size(); ++b)
          run_standard(cu_q[b], cu_k[b], c.lens_q[b], c.used_k.empty() ? c.lens_k[b] : c.used_k[b], int(b));
      } else if (!c.used_k.empty()) {
        for (int b = 0; b < c.batch; ++b) run_standard(int64_t(b) * c.sq, int64_t(b) * c.sk, c.sq, c.used_k[b], b);
      } else {
        run_standard(0, 0, c.sq, c.sk, 0);
      }
    } catch (const std::exception& e) {
      FAIL() << "standard attention (baseline) threw: " << e.what();
    }

    ASSERT_EQ(ours_out.size(), ref_out.size());
    ASSERT_EQ(ours_lse.size(), ref_lse.size());
    EXPECT_TRUE(within("out", c.dtype, ours_out, base_out, ref_out)) << "kernel: " << kernel;
    EXPECT_TRUE(within("lse", c.dtype, ours_lse, base_lse, ref_lse)) << "kernel: " << kernel;

    // Rows the oracle calls empty: exactly O = 0 and LSE = -inf.
    int64_t bad_empty = 0, empty_rows = 0;
    for (int64_t r = 0; r < used_q; ++r)
      for (int h = 0; h < c.heads; ++h) {
        const int64_t li = varlen ? h * used_q + r : (r / c.sq * c.heads + h) * c.sq + r % c.sq;
        if (ref_lse[li] != -kInf) continue;
        ++empty_rows;
        bool ok = ours_lse[li] == -kInf;
        for (int d = 0; d < dv; ++d) ok = ok && ours_out[(r * c.heads + h) * dv + d] == 0.0;
        bad_empty += !ok;
      }
    EXPECT_EQ(bad_empty, 0) << "of " << empty_rows << " fully masked rows are not exactly O = 0, LSE = -inf; kernel: "
                            << kernel;
  }

 private:
  Case c_;
  std::vector<uint16_t> hq_, hk_, hv_;
};

// ---- the case list ----------------------------------------------------------------------------
// Every seqlen of {1, 7, 63, 64, 65, 127, 128, 129, 1013} and every head dim of
// {32, 40, 64, 80, 96, 128, 192, 256} appears, with sq != sk both ways, GQA 1/2/8, both dtypes,
// each mask and score modifier, strided layouts, and varlen batches with empty sequences.
std::vector<Case> cases() {
  std::vector<Case> v;
  const int dims[] = {32, 40, 64, 80, 96, 128, 192, 256};
  const int seqs[] = {1, 7, 63, 64, 65, 127, 128, 129, 1013};
  const int n_seq = 9;
  int k = 0;
  for (int di = 0; di < 8; ++di) {
    for (int rep = 0; rep < 3; ++rep, ++k) {
      Case c;
      c.d = dims[di];
      c.sq = seqs[k % n_seq];
      c.sk = seqs[(k * 4 + 3) % n_seq];  // differs from sq, larger and smaller in turn
      if (c.sq == 1013 && c.sk == 1013) c.sk = 129;
      c.dtype = k % 2 ? DType::f16 : DType::bf16;
      const int ratio = (k % 3 == 0) ? 1 : (k % 3 == 1 ? 2 : 8);
      c.heads = 8;
      c.heads_k = 8 / ratio;
      if (c.sq * c.sk > 200000) c.heads = ratio == 8 ? 8 : 2, c.heads_k = c.heads / std::min(ratio, c.heads);
      c.batch = (c.sq * c.sk < 5000) ? 3 : 1;
      switch (k % 6) {
        case 0: break;
        case 1: c.causal = true; break;
        case 2: c.wl = 37; c.wr = 11; break;
        case 3: c.causal = true; c.softcap = 15.0f; break;
        case 4: c.alibi = true; break;
        case 5: c.causal = true; c.alibi = true; c.wl = 70; break;
      }
      c.layout = k % 4 == 3 ? Layout::bhsd : Layout::dense;
      std::ostringstream n;
      n << "d" << c.d << "_sq" << c.sq << "_sk" << c.sk << "_b" << c.batch << "_h" << c.heads << "_" << c.heads_k
        << (c.dtype == DType::bf16 ? "_bf16" : "_fp16") << (c.causal ? "_causal" : "")
        << (c.wl >= 0 || c.wr >= 0 ? "_win" : "") << (c.softcap > 0 ? "_softcap" : "") << (c.alibi ? "_alibi" : "")
        << (c.layout == Layout::bhsd ? "_bhsd" : "");
      c.name = n.str();
      v.push_back(c);
    }
  }
  // Long sequences on both sides, the blocks the benchmark uses.
  for (int d : {64, 128}) {
    for (bool causal : {false, true}) {
      Case c;
      c.d = d;
      c.sq = c.sk = 1013;
      c.heads = 2;
      c.heads_k = 2;
      c.causal = causal;
      c.name = "long_d" + std::to_string(d) + (causal ? "_causal" : "");
      v.push_back(c);
    }
  }
  {  // sq > sk with causal: the first sq - sk rows see nothing (empty rows)
    Case c;
    c.d = 64;
    c.sq = 129;
    c.sk = 63;
    c.heads = 4;
    c.heads_k = 2;
    c.causal = true;
    c.dtype = DType::f16;
    c.name = "causal_sq_gt_sk_empty_rows";
    v.push_back(c);
  }
  {  // a window that leaves some rows empty (left and right bounded, sq > sk)
    Case c;
    c.d = 128;
    c.sq = 200;
    c.sk = 65;
    c.heads = 2;
    c.heads_k = 1;
    c.wl = 3;
    c.wr = 0;
    c.name = "window_empty_rows";
    v.push_back(c);
  }
  for (bool causal : {false, true}) {  // d = 256 with A100's tiles (H100 picks larger ones)
    Case c;
    c.d = 256;
    c.sq = 129;
    c.sk = 1013;
    c.heads = 2;
    c.heads_k = 1;
    c.causal = causal;
    c.small_tiles = true;
    c.force = KernelChoice::kSm80;  // the tiles are the sm80 kernel's
    c.dtype = causal ? DType::f16 : DType::bf16;
    c.name = std::string("d256_sm80_tiles") + (causal ? "_causal" : "");
    v.push_back(c);
  }
  for (float scale : {-0.2f, 0.5f}) {  // an explicit scale; a negative one flips which score is the max
    Case c;
    c.d = 64;
    c.sq = 65;
    c.sk = 129;
    c.heads = 2;
    c.heads_k = 1;
    c.causal = scale > 0;
    c.scale = scale;
    c.name = scale < 0 ? "negative_scale" : "scale_0_5_causal";
    v.push_back(c);
  }
  {  // head_dim_v != head_dim
    Case c;
    c.d = 128;
    c.dv = 64;
    c.sq = 127;
    c.sk = 129;
    c.heads = 4;
    c.heads_k = 4;
    c.name = "dv64_d128";
    v.push_back(c);
  }
  // Several query and key blocks of the sm90 kernel (192/128 rows, 128/112/80 keys), partial last
  // blocks on both sides, GQA ratio 3, windows; padded head dims.
  {
    struct Long {
      const char* name;
      int d, sq, sk, heads, heads_k;
      DType dtype;
      bool causal;
      int wl, wr;
    };
    const Long longs[] = {
        {"multiblock_d128_causal_fp16", 128, 777, 1500, 4, 2, DType::f16, true, -1, -1},
        {"multiblock_d64_gqa3_bf16", 64, 1500, 777, 3, 1, DType::bf16, false, -1, -1},
        {"multiblock_d256_causal_bf16", 256, 300, 1013, 2, 2, DType::bf16, true, -1, -1},
        {"multiblock_d192_fp16", 192, 400, 700, 2, 1, DType::f16, false, -1, -1},
        {"multiblock_d64_window_bf16", 64, 1013, 1013, 2, 2, DType::bf16, false, 100, 50},
        {"multiblock_d96_causal_bf16", 96, 600, 600, 2, 2, DType::bf16, true, -1, -1},
    };
    for (const Long& l : longs) {
      Case c;
      c.name = l.name;
      c.d = l.d;
      c.sq = l.sq;
      c.sk = l.sk;
      c.heads = l.heads;
      c.heads_k = l.heads_k;
      c.dtype = l.dtype;
      c.causal = l.causal;
      c.wl = l.wl;
      c.wr = l.wr;
      v.push_back(c);
    }
  }
  // The sm90 kernel's persistent grid capped at a few CTAs: each walks many tiles, the K/V ring and
  // the Q buffer change hands across tiles, and tiles without keys (sq > sk, causal) come between.
  {
    struct Persist {
      const char* name;
      int d, sq, sk, batch, heads, heads_k, ctas;
      DType dtype;
      bool causal;
    };
    const Persist ps[] = {
        {"persistent_d128_causal_3ctas", 128, 777, 1500, 2, 4, 2, 3, DType::f16, true},
        {"persistent_d64_empty_tiles_2ctas", 64, 900, 200, 2, 3, 1, 2, DType::bf16, true},
        {"persistent_d256_o_in_q_2ctas", 256, 500, 300, 1, 3, 3, 2, DType::bf16, true},
        {"persistent_d128_1cta", 128, 300, 333, 3, 2, 2, 1, DType::bf16, false},
    };
    for (const Persist& x : ps) {
      Case c;
      c.name = x.name;
      c.d = x.d;
      c.sq = x.sq;
      c.sk = x.sk;
      c.batch = x.batch;
      c.heads = x.heads;
      c.heads_k = x.heads_k;
      c.sm90_ctas = x.ctas;
      c.dtype = x.dtype;
      c.causal = x.causal;
      v.push_back(c);
    }
  }
  // Varlen with zero-length sequences (q, k or both), GQA, causal, strided.
  {
    Case c;
    c.name = "varlen_bf16_causal_gqa";
    c.lens_q = {65, 0, 1, 129, 7, 0, 300};
    c.lens_k = {65, 10, 0, 129, 63, 0, 1013};
    c.batch = int(c.lens_q.size());
    c.heads = 8;
    c.heads_k = 2;
    c.d = 128;
    c.causal = true;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "varlen_fp16_window_bhsd";
    c.lens_q = {128, 1, 0, 64, 127};
    c.lens_k = {64, 1013, 5, 0, 200};
    c.batch = int(c.lens_q.size());
    c.heads = 4;
    c.heads_k = 4;
    c.d = 64;
    c.dtype = DType::f16;
    c.wl = 20;
    c.wr = 20;
    c.layout = Layout::bhsd;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "varlen_bf16_softcap_alibi_d96";
    c.lens_q = {33, 129, 0};
    c.lens_k = {129, 33, 7};
    c.batch = int(c.lens_q.size());
    c.heads = 8;
    c.heads_k = 1;
    c.d = 96;
    c.softcap = 20.0f;
    c.alibi = true;
    v.push_back(c);
  }
  return v;
}

// Split-KV (flash-decoding) and the decode kernel: packed GQA rows (seqlen_q x group <= 64) take
// the decode kernel, longer queries the main kernel's split path. Split counts 1 / 2 / 3 / many /
// more than there are key blocks / heuristic, empty splits (varlen sequences shorter than the
// split boundaries, causal rows that end before a split), every mask and score modifier, GQA
// 1 / 4 / 8, strided layouts, head_dim_v != head_dim, padded head dims.
std::vector<Case> split_cases() {
  std::vector<Case> v;
  auto add = [&](Case c, const std::string& name) {
    c.name = name;
    v.push_back(c);
  };
  Case dec;  // one decode step: 32 query heads over 8 kv heads
  dec.sq = 1;
  dec.sk = 1013;
  dec.heads = 32;
  dec.heads_k = 8;
  dec.d = 128;
  for (int splits : {1, 2, 3, 13, 1000, 0}) {
    Case c = dec;
    c.num_splits = splits;
    add(c, "decode_gqa4_sk1013_splits" + std::to_string(splits));
  }
  {
    Case c = dec;
    c.batch = 2;
    c.sk = 20000;
    c.heads = 8;
    c.heads_k = 2;
    c.num_splits = 0;  // heuristic: few CTAs, long keys -> many splits
    add(c, "decode_long_sk20000_heuristic");
  }
  {
    Case c = dec;  // 16 packed rows exactly: 4 queries x group 4, causal (each query one key more)
    c.sq = 4;
    c.heads = 8;
    c.heads_k = 2;
    c.causal = true;
    c.num_splits = 3;
    c.dtype = DType::f16;
    add(c, "decode_sq4_causal_splits3_fp16");
  }
  {
    Case c = dec;  // 56 packed rows (4 tiles, the last partial), window, group 8
    c.sq = 7;
    c.sk = 700;
    c.heads = 8;
    c.heads_k = 1;
    c.wl = 100;
    c.wr = 3;
    c.num_splits = 5;
    add(c, "decode_sq7_group8_window_splits5");
  }
  {
    Case c = dec;  // softcap + ALiBi, MHA (group 1: 1 of 16 rows used), d 64
    c.sq = 1;
    c.sk = 1013;
    c.heads = 4;
    c.heads_k = 4;
    c.d = 64;
    c.softcap = 10.0f;
    c.alibi = true;
    c.num_splits = 4;
    c.dtype = DType::f16;
    add(c, "decode_mha_d64_softcap_alibi_splits4");
  }
  {
    Case c = dec;  // causal + ALiBi + window, sq 2 group 4, split
    c.sq = 2;
    c.sk = 333;
    c.heads = 8;
    c.heads_k = 2;
    c.causal = true;
    c.alibi = true;
    c.wl = 64;
    c.num_splits = 2;
    add(c, "decode_causal_alibi_window_splits2");
  }
  {
    Case c = dec;  // strided (b, h, s, d + 8) layouts, padded head dim 40 -> 64, dv != d
    c.batch = 3;
    c.sq = 1;
    c.sk = 129;
    c.heads = 4;
    c.heads_k = 2;
    c.d = 40;
    c.layout = Layout::bhsd;
    c.num_splits = 2;
    add(c, "decode_bhsd_d40_splits2");
  }
  {
    Case c = dec;
    c.d = 128;
    c.dv = 64;
    c.sk = 500;
    c.heads = 8;
    c.heads_k = 2;
    c.num_splits = 3;
    add(c, "decode_dv64_d128_splits3");
  }
  {
    Case c = dec;  // no keys at all: O = 0, LSE = -inf
    c.sk = 0;
    c.heads = 4;
    c.heads_k = 1;
    c.num_splits = 2;
    add(c, "decode_no_keys");
  }
  {
    Case c = dec;  // decode shapes through the main kernel's split path (1 valid row per 128)
    c.heads = 8;
    c.heads_k = 2;
    c.decode_kernel = false;
    c.num_splits = 3;
    add(c, "main_kernel_sq1_splits3");
  }
  // Varlen decode: sequences shorter than the split boundaries leave whole splits empty.
  for (int splits : {8, 0}) {
    Case c;
    c.lens_q = {1, 0, 3, 1, 2};
    c.lens_k = {1013, 50, 0, 3000, 5};
    c.batch = int(c.lens_q.size());
    c.heads = 16;
    c.heads_k = 4;
    c.d = 128;
    c.causal = splits == 8;
    c.num_splits = splits;
    add(c, "varlen_decode_splits" + std::to_string(splits));
  }
  // seqused_k: a fixed-size KV cache filled to a different length per sequence (one empty).
  for (int splits : {0, 1, 3}) {
    Case c = dec;
    c.batch = 4;
    c.sk = 2000;
    c.heads = 16;
    c.heads_k = 4;
    c.used_k = {2000, 777, 0, 65};
    c.num_splits = splits;
    add(c, "seqused_k_decode_splits" + std::to_string(splits));
  }
  {
    Case c = dec;  // causal chunk of 3 queries aligned on the used length (one shorter than 3)
    c.batch = 3;
    c.sq = 3;
    c.sk = 500;
    c.heads = 8;
    c.heads_k = 2;
    c.causal = true;
    c.alibi = true;
    c.used_k = {400, 2, 129};
    c.num_splits = 2;
    c.dtype = DType::f16;
    add(c, "seqused_k_causal_alibi_sq3");
  }
  {
    Case c;  // the main kernel (130 packed rows), split
    c.batch = 2;
    c.sq = 130;
    c.sk = 700;
    c.heads = 2;
    c.heads_k = 2;
    c.d = 128;
    c.causal = true;
    c.used_k = {300, 699};
    c.num_splits = 3;
    add(c, "seqused_k_main_causal_splits3");
  }
  {
    Case c;  // varlen + seqused_k: a prefix of each sequence's packed keys
    c.lens_q = {1, 2, 1};
    c.lens_k = {900, 64, 300};
    c.used_k = {450, 0, 300};
    c.batch = 3;
    c.heads = 8;
    c.heads_k = 2;
    c.d = 64;
    c.causal = true;
    c.num_splits = 4;
    add(c, "seqused_k_varlen_splits4");
  }
  // The main kernel's split path: longer queries (more than 64 packed rows).
  {
    Case c;
    c.sq = 129;
    c.sk = 1013;
    c.heads = 4;
    c.heads_k = 2;
    c.d = 128;
    c.causal = true;  // early query blocks see only the first splits: the others are empty
    c.num_splits = 3;
    add(c, "main_causal_sq129_splits3");
  }
  {
    Case c;
    c.sq = 200;
    c.sk = 1013;
    c.heads = 2;
    c.heads_k = 1;
    c.d = 64;
    c.wl = 40;
    c.wr = 40;
    c.softcap = 20.0f;
    c.alibi = true;
    c.num_splits = 7;
    c.dtype = DType::f16;
    add(c, "main_window_softcap_alibi_splits7");
  }
  {
    Case c;
    c.sq = 65;
    c.sk = 300;
    c.heads = 4;
    c.heads_k = 4;
    c.d = 64;
    c.layout = Layout::bhsd;
    c.num_splits = 1000;  // more than the key blocks: clamped, trailing splits may be empty
    add(c, "main_bhsd_splits_many");
  }
  {
    Case c;
    c.sq = 300;
    c.sk = 8000;
    c.heads = 2;
    c.heads_k = 1;
    c.d = 128;
    c.num_splits = 0;  // heuristic: 6 CTAs, long keys
    add(c, "main_heuristic_sq300_sk8000");
  }
  {
    Case c;
    c.lens_q = {129, 0, 70, 1};
    c.lens_k = {1013, 10, 0, 600};
    c.batch = int(c.lens_q.size());
    c.heads = 4;
    c.heads_k = 2;
    c.d = 128;
    c.dtype = DType::f16;
    c.causal = true;
    c.num_splits = 4;
    add(c, "main_varlen_causal_splits4");
  }
  return v;
}

class CudaForward : public ::testing::TestWithParam<Case> {};

TEST_P(CudaForward, MatchesOracle) {
  SKIP_WITHOUT_GPU();
  ForwardRun(GetParam()).run();
}

INSTANTIATE_TEST_SUITE_P(Grid, CudaForward, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });
INSTANTIATE_TEST_SUITE_P(SplitKV, CudaForward, ::testing::ValuesIn(split_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// The split plan (host only, no GPU needed): chunks are whole key units that cover the keys, the
// heuristic fills an underused GPU and leaves a full one alone, an explicit count is kept.
TEST(CudaSplitKV, PlanSplits) {
  flashattn::AttnParams p;
  p.batch = 1;
  p.seqlen_q = 1;
  auto check = [&](int64_t sk, int num_splits, int64_t ctas, int64_t slots, int64_t unit) {
    p.seqlen_k = sk;
    p.num_splits = num_splits;
    const auto plan = flashattn::cuda::plan_splits(p, ctas, slots, unit, 4 * unit);
    EXPECT_GE(plan.splits, 1);
    EXPECT_EQ(plan.chunk % unit, 0);
    EXPECT_GE(plan.splits * plan.chunk, sk);
    if (num_splits == 0) {
      EXPECT_LT((plan.splits - 1) * plan.chunk, std::max<int64_t>(sk, 1)) << "an empty split";
      if (plan.splits > 1) {
        EXPECT_GE(plan.chunk, 4 * unit) << "splits below min_keys";
      }
    }
    return plan;
  };
  // Decode, b1 x 8 kv heads on 132 SMs (the decode kernel's wave: one CTA per SM): about one wave.
  const auto plan = check(32768, 0, 8, 132, 64);
  EXPECT_GE(plan.splits * 8, 106);
  EXPECT_LE(plan.splits * 8, 132);
  // b16: 128 CTAs nearly fill 132 SMs: no split; on twice the slots, two splits.
  EXPECT_EQ(check(131072, 0, 128, 132, 64).splits, 1);
  EXPECT_EQ(check(131072, 0, 128, 264, 64).splits, 2);
  // A full GPU or one key unit: no split.
  EXPECT_EQ(check(131072, 0, 1024, 264, 64).splits, 1);
  EXPECT_EQ(check(100, 0, 8, 264, 64).splits, 1);
  EXPECT_EQ(check(0, 0, 8, 264, 64).splits, 1);
  // Explicit counts: kept, clamped to the key units.
  EXPECT_EQ(check(32768, 1, 8, 264, 64).splits, 1);
  EXPECT_EQ(check(32768, 3, 8, 264, 64).splits, 3);
  EXPECT_EQ(check(1013, 1000, 8, 264, 64).splits, 16);
  EXPECT_EQ(check(32768, 7, 100000, 264, 64).splits, 7);
}

// Split and un-split runs of one decode problem agree to the rounding of the stored output (2 bf16
// ulps: P is rounded against different maxima) and their LSEs to fp32 rounding.
TEST(CudaSplitKV, SplitMatchesUnsplit) {
  SKIP_WITHOUT_GPU();
  const int b = 2, sk = 4000, h = 16, hk = 4, d = 128;
  std::mt19937_64 rng(seed_for("split_vs_unsplit"));
  std::normal_distribution<float> normal(0.f, 1.f);
  auto random_bf16 = [&](int64_t n) {
    std::vector<uint16_t> x(n);
    for (auto& e : x) e = flashattn::float_to_bf16(normal(rng));
    return x;
  };
  const auto hq = random_bf16(int64_t(b) * h * d), hk_ = random_bf16(int64_t(b) * sk * hk * d),
             hv = random_bf16(int64_t(b) * sk * hk * d);
  DeviceBuffer gq(2, int64_t(hq.size())), gk(2, int64_t(hk_.size())), gv(2, int64_t(hv.size()));
  ASSERT_TRUE(gq.ok() && gk.ok() && gv.ok());
  CUDA_OK(cudaMemcpy(gq.data(), hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(gk.data(), hk_.data(), hk_.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(gv.data(), hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  const Device dev = Device::cuda(0);
  const Tensor tq = Tensor::contiguous(gq.data(), DType::bf16, {b, 1, h, d}, dev);
  const Tensor tk = Tensor::contiguous(gk.data(), DType::bf16, {b, sk, hk, d}, dev);
  const Tensor tv = Tensor::contiguous(gv.data(), DType::bf16, {b, sk, hk, d}, dev);
  std::vector<std::vector<uint16_t>> outs;
  std::vector<std::vector<float>> lses;
  for (int splits : {1, 2, 7, 40}) {
    DeviceBuffer go(2, int64_t(b) * h * d), gl(4, int64_t(b) * h);
    ASSERT_TRUE(go.ok() && gl.ok());
    Options opt;
    opt.num_splits = splits;
    ASSERT_NO_THROW(flashattn::forward(tq, tk, tv, Tensor::contiguous(go.data(), DType::bf16, {b, 1, h, d}, dev),
                                       Tensor::contiguous(gl.data(), DType::f32, {b, h, 1}, dev), opt));
    CUDA_OK(cudaDeviceSynchronize());
    outs.emplace_back(size_t(b) * h * d);
    lses.emplace_back(size_t(b) * h);
    CUDA_OK(cudaMemcpy(outs.back().data(), go.data(), outs.back().size() * 2, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(lses.back().data(), gl.data(), lses.back().size() * 4, cudaMemcpyDeviceToHost));
  }
  for (size_t s = 1; s < outs.size(); ++s) {
    int64_t bad = 0;
    for (size_t i = 0; i < outs[0].size(); ++i) {
      const double a = flashattn::bf16_to_float(outs[0][i]), c = flashattn::bf16_to_float(outs[s][i]);
      bad += !(std::abs(a - c) <= 1.6e-2 * std::max(std::abs(a), 0.05));  // 2 bf16 ulps
    }
    for (size_t i = 0; i < lses[0].size(); ++i)
      bad += !(std::abs(lses[0][i] - lses[s][i]) <= 1e-4f * std::max(1.0f, std::abs(lses[0][i])));
    EXPECT_EQ(bad, 0) << "split run " << s << " differs from the un-split run";
  }
}

// ---- errors -------------------------------------------------------------------------------------
TEST(CudaErrors, HeadDimNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 2 * 4 * 36), o(2, 2 * 4 * 36), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor tq = Tensor::contiguous(q.data(), DType::bf16, {1, 2, 2, 36}, dev);
  Tensor to = Tensor::contiguous(o.data(), DType::bf16, {1, 2, 2, 36}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 2, 2}, dev);
  try {
    flashattn::forward(tq, tq, tq, to, tl);
    FAIL() << "expected flashattn::Error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "q") << e.what();
    EXPECT_NE(std::string(e.what()).find("multiple of 8"), std::string::npos) << e.what();
  }
}

TEST(CudaErrors, MisalignedRows) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 4 * 64 + 8), o(2, 4 * 64), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor tq = Tensor::contiguous(static_cast<uint16_t*>(q.data()) + 1, DType::bf16, {1, 4, 1, 64}, dev);
  Tensor tk = Tensor::contiguous(q.data(), DType::bf16, {1, 4, 1, 64}, dev);
  Tensor to = Tensor::contiguous(o.data(), DType::bf16, {1, 4, 1, 64}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  try {
    flashattn::forward(tq, tk, tk, to, tl);
    FAIL() << "expected flashattn::Error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "q") << e.what();
  }
}

// ---- which kernel runs ------------------------------------------------------------------------------
// Params of a small problem on the GPU (buffers only; nothing runs).
struct DispatchProblem {
  DeviceBuffer q, k, v, o, l;
  Tensor tq, tk, tv, to, tl;
  DispatchProblem(int d, DType t, int heads, int heads_k)
      : q(2, 2 * 100 * heads * d), k(2, 2 * 100 * heads_k * d), v(2, 2 * 100 * heads_k * d),
        o(2, 2 * 100 * heads * d), l(4, 2 * heads * 100) {
    const Device dev = Device::cuda(0);
    tq = Tensor::contiguous(q.data(), t, {2, 100, heads, d}, dev);
    tk = Tensor::contiguous(k.data(), t, {2, 100, heads_k, d}, dev);
    tv = Tensor::contiguous(v.data(), t, {2, 100, heads_k, d}, dev);
    to = Tensor::contiguous(o.data(), t, {2, 100, heads, d}, dev);
    tl = Tensor::contiguous(l.data(), DType::f32, {2, heads, 100}, dev);
  }
  std::string kernel(const Options& opt) const {
    return flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, to, tl, opt, nullptr));
  }
};

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

TEST(CudaDispatch, Sm90RunsEveryCoveredCaseOnHopper) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  ScopedKnobs automatic([](Knobs& k) { k.cuda_forward = KernelChoice::kAuto; });  // also when the run forces sm80
  for (int d : {32, 64, 96, 128})
    for (DType t : {DType::bf16, DType::f16})
      for (bool causal : {false, true}) {
        DispatchProblem prob(d, t, 4, 2);
        Options opt;
        opt.causal = causal;
        const std::string k = prob.kernel(opt);
        EXPECT_TRUE(starts_with(k, "flash_fwd_sm90")) << "d " << d << (causal ? " causal" : "") << ": " << k;
        ScopedKnobs force([](Knobs& k) { k.cuda_forward = KernelChoice::kSm80; });
        const std::string k80 = prob.kernel(opt);
        EXPECT_TRUE(starts_with(k80, "flash_fwd_sm80")) << "FLASHATTN_CUDA_FORWARD=sm80 must pick sm80: " << k80;
      }
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options window;
  window.window_left = 16;
  window.window_right = 3;
  EXPECT_TRUE(starts_with(prob.kernel(window), "flash_fwd_sm90")) << prob.kernel(window);
}

// d64 under a causal mask with a short query sequence takes the narrow 128-row tile, unmasked calls
// the 192-row one; FLASHATTN_SM90_NARROW forces either.
TEST(CudaDispatch, Sm90D64CausalShortTakesTheNarrowTile) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  ScopedKnobs automatic([](Knobs& k) {
    k.cuda_forward = KernelChoice::kAuto;
    k.sm90_narrow = flashattn::Override::kAuto;
  });
  DispatchProblem prob(64, DType::bf16, 4, 2);
  Options causal;
  causal.causal = true;
  EXPECT_NE(prob.kernel(causal).find("128x128, 2+1 warpgroups"), std::string::npos) << prob.kernel(causal);
  EXPECT_NE(prob.kernel(Options{}).find("192x128, 3+1 warpgroups"), std::string::npos) << prob.kernel(Options{});
  ScopedKnobs wide([](Knobs& k) { k.sm90_narrow = flashattn::Override::kOff; });
  EXPECT_NE(prob.kernel(causal).find("192x128, 3+1 warpgroups"), std::string::npos) << prob.kernel(causal);
}

// Decoding (a few query rows per kv head) takes the split-KV decode kernel, on Hopper too.
TEST(CudaDispatch, DecodeShapesTakeTheDecodeKernel) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 2 * 32 * 128), o(2, 2 * 32 * 128), l(4, 2 * 32), k(2, 2 * 4096 * 8 * 128), v(2, 2 * 4096 * 8 * 128);
  const Device dev = Device::cuda(0);
  const Tensor tq = Tensor::contiguous(q.data(), DType::bf16, {2, 1, 32, 128}, dev);
  const Tensor to = Tensor::contiguous(o.data(), DType::bf16, {2, 1, 32, 128}, dev);
  const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {2, 32, 1}, dev);
  const Tensor tk = Tensor::contiguous(k.data(), DType::bf16, {2, 4096, 8, 128}, dev);
  const Tensor tv = Tensor::contiguous(v.data(), DType::bf16, {2, 4096, 8, 128}, dev);
  const std::string kernel =
      flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, to, tl, Options{}, nullptr));
  EXPECT_TRUE(starts_with(kernel, "decode_sm80")) << kernel;
}

TEST(CudaDispatch, UncoveredCallsFallBackToSm80) {
  SKIP_WITHOUT_GPU();
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options softcap;
  softcap.softcap = 10.0f;
  EXPECT_TRUE(starts_with(prob.kernel(softcap), "flash_fwd_sm80")) << prob.kernel(softcap);
  Options negative;
  negative.softmax_scale = -0.1f;
  EXPECT_TRUE(starts_with(prob.kernel(negative), "flash_fwd_sm80")) << prob.kernel(negative);
}

TEST(CudaDispatch, ForcedSm90SaysWhyItCannotRun) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options softcap;
  softcap.softcap = 10.0f;
  ScopedKnobs force([](Knobs& k) { k.cuda_forward = KernelChoice::kSm90; });
  try {
    prob.kernel(softcap);
    FAIL() << "expected flashattn::Unsupported";
  } catch (const flashattn::Unsupported& e) {
    EXPECT_NE(std::string(e.what()).find("softcap"), std::string::npos) << e.what();
  }
}


// ---- no LSE wanted -----------------------------------------------------------------------------------
// A default Tensor{} as lse: the same output bits as with an LSE, on every kernel family (sm90 where
// the GPU has it, sm80, the decode kernel split and not, the main kernel's split path).
TEST(CudaForward, OmittedLseGivesTheSameOutput) {
  SKIP_WITHOUT_GPU();
  struct Shape {
    int b, sq, sk, h, hk, d, splits;
    bool causal;
    const char* what;
  };
  const Shape shapes[] = {{2, 300, 300, 4, 2, 128, 0, true, "prefill"},
                          {1, 257, 1000, 2, 2, 64, 1, false, "prefill d64"},
                          {2, 1, 3000, 8, 2, 128, 0, false, "decode, split heuristic"},
                          {2, 1, 3000, 8, 2, 128, 1, false, "decode, no split"},
                          {1, 200, 4000, 2, 1, 64, 3, true, "main kernel, 3 splits"}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE(s.what);
    const int64_t nq = int64_t(s.b) * s.sq * s.h * s.d, nk = int64_t(s.b) * s.sk * s.hk * s.d;
    DeviceBuffer q(2, nq), k(2, nk), v(2, nk), o1(2, nq), o2(2, nq), l(4, int64_t(s.b) * s.h * s.sq);
    std::mt19937_64 rng(seed_for(s.what));
    auto fill = [&](const DeviceBuffer& buf) {
      std::vector<uint8_t> h = buf.download();
      for (size_t i = DeviceBuffer::kGuard; i + 2 <= h.size() - DeviceBuffer::kGuard; i += 2) {
        const uint16_t x = 0x3c00 ^ uint16_t(rng() & 0x83ff);  // random bf16 of magnitude 2^-8 .. 2, either sign
        std::memcpy(&h[i], &x, 2);
      }
      ASSERT_TRUE(buf.upload(h));
    };
    fill(q);
    fill(k);
    fill(v);
    const Device dev = Device::cuda(0);
    const Tensor tq = Tensor::contiguous(q.data(), DType::bf16, {s.b, s.sq, s.h, s.d}, dev);
    const Tensor tk = Tensor::contiguous(k.data(), DType::bf16, {s.b, s.sk, s.hk, s.d}, dev);
    const Tensor tv = Tensor::contiguous(v.data(), DType::bf16, {s.b, s.sk, s.hk, s.d}, dev);
    const Tensor t1 = Tensor::contiguous(o1.data(), DType::bf16, {s.b, s.sq, s.h, s.d}, dev);
    const Tensor t2 = Tensor::contiguous(o2.data(), DType::bf16, {s.b, s.sq, s.h, s.d}, dev);
    const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {s.b, s.h, s.sq}, dev);
    Options opt;
    opt.causal = s.causal;
    opt.num_splits = s.splits;
    const std::vector<uint8_t> before = o2.download();
    ASSERT_NO_THROW(flashattn::forward(tq, tk, tv, t1, tl, opt));
    ASSERT_NO_THROW(flashattn::forward(tq, tk, tv, t2, Tensor{}, opt));
    CUDA_OK(cudaDeviceSynchronize());
    // The data regions (the guards around them were never written and may differ).
    auto data = [&](const std::vector<uint8_t>& h) {
      return std::vector<uint8_t>(h.begin() + DeviceBuffer::kGuard, h.begin() + DeviceBuffer::kGuard + 2 * nq);
    };
    const std::vector<uint8_t> a = data(o1.download()), b = data(o2.download());
    EXPECT_NE(b, data(before)) << "the call without LSE wrote nothing";
    EXPECT_EQ(a, b) << "kernel: "
                    << flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, t2, Tensor{}, opt, nullptr));
  }
}

// ---- merge ---------------------------------------------------------------------------------------
// The CUDA merge against the CPU merge: 16-byte loads (d_v % 4 == 0) and the scalar path, few
// splits and more than one load round per warp, rows empty in every split.
void check_merge_matches_cpu(int splits, int dv) {
  const int batch = 2, sq = 37, heads = 3;
  std::mt19937_64 rng(seed_for("merge" + std::to_string(splits) + "_" + std::to_string(dv)));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> po(size_t(splits) * batch * sq * heads * dv), pl(size_t(splits) * batch * heads * sq);
  for (auto& x : po) x = normal(rng);
  for (size_t i = 0; i < pl.size(); ++i) pl[i] = i % 7 == 0 ? -INFINITY : 3.0f * normal(rng);
  // One row empty in every split.
  for (int c = 0; c < splits; ++c) pl[((size_t(c) * batch + 1) * heads + 2) * sq + 5] = -INFINITY;
  DeviceBuffer gpo(4, int64_t(po.size())), gpl(4, int64_t(pl.size())), gout(2, int64_t(batch) * sq * heads * dv),
      glse(4, int64_t(batch) * heads * sq);
  CUDA_OK(cudaMemcpy(gpo.data(), po.data(), po.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(gpl.data(), pl.data(), pl.size() * 4, cudaMemcpyHostToDevice));
  const Device dev = Device::cuda(0);
  flashattn::merge(Tensor::contiguous(gpo.data(), DType::f32, {splits, batch, sq, heads, dv}, dev),
                   Tensor::contiguous(gpl.data(), DType::f32, {splits, batch, heads, sq}, dev),
                   Tensor::contiguous(gout.data(), DType::bf16, {batch, sq, heads, dv}, dev),
                   Tensor::contiguous(glse.data(), DType::f32, {batch, heads, sq}, dev));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(size_t(batch) * sq * heads * dv), cpu_out(out.size());
  std::vector<float> lse(size_t(batch) * heads * sq), cpu_lse(lse.size());
  CUDA_OK(cudaMemcpy(out.data(), gout.data(), out.size() * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), glse.data(), lse.size() * 4, cudaMemcpyDeviceToHost));
  flashattn::merge(Tensor::contiguous(po.data(), DType::f32, {splits, batch, sq, heads, dv}),
                   Tensor::contiguous(pl.data(), DType::f32, {splits, batch, heads, sq}),
                   Tensor::contiguous(cpu_out.data(), DType::bf16, {batch, sq, heads, dv}),
                   Tensor::contiguous(cpu_lse.data(), DType::f32, {batch, heads, sq}));
  int64_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double a = flashattn::bf16_to_float(out[i]), b = flashattn::bf16_to_float(cpu_out[i]);
    bad += !(std::abs(a - b) <= 1e-2 * std::max(1.0, std::abs(b)));  // one bf16 ulp apart at most
  }
  for (size_t i = 0; i < lse.size(); ++i)
    bad += !(lse[i] == cpu_lse[i] || std::abs(lse[i] - cpu_lse[i]) <= 1e-5f * std::max(1.0f, std::abs(cpu_lse[i])));
  EXPECT_EQ(bad, 0) << splits << " splits, d_v " << dv;
}

TEST(CudaMerge, MatchesCpuMerge) {
  SKIP_WITHOUT_GPU();
  check_merge_matches_cpu(3, 72);   // 16-byte loads
  check_merge_matches_cpu(40, 72);  // more splits than one round of loads per warp covers
  check_merge_matches_cpu(5, 70);   // scalar loads (d_v % 4 != 0)
  check_merge_matches_cpu(1, 264);  // two column passes
}

class SummaryPrinter : public ::testing::EmptyTestEventListener {
  void OnTestProgramEnd(const ::testing::UnitTest&) override {
    if (!gpu_present()) return;
    std::printf("[summary] %d checks; max|ours-ref| out: bf16 %.3g (largest bound %.3g), fp16 %.3g "
                "(largest bound %.3g); lse: bf16 %.3g, fp16 %.3g; grid cases run by sm90 %d, by sm80 %d\n",
                g_summary.checks, g_summary.out_err[0], g_summary.out_bound[0], g_summary.out_err[1],
                g_summary.out_bound[1], g_summary.lse_err[0], g_summary.lse_err[1], g_summary.sm90_cases,
                g_summary.sm80_cases);
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest::GetInstance()->listeners().Append(new SummaryPrinter);
  return RUN_ALL_TESTS();
}
