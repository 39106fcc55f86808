// GPU tests of the CUDA backward: flashattn::backward / backward_varlen on device tensors, after
// our CUDA forward on the same inputs, checked against the fp64 oracle (ref::backward) on host
// copies with the docs/DESIGN.md §5 rule for each of dQ, dK, dV (tests/common/testing.h, `close`):
//   max|ours - ref| <= 2 * max|base - ref| + atol_rel * max|ref|
// where base = the standard attention forward + backward in the input dtype (flashattn::standard,
// CPU), atol_rel = 1e-2 (bf16) / 1e-3 (fp16).
//
// Every gradient buffer is poisoned (NaN) with guard bands around it; strided layouts leave gaps,
// and varlen tensors rows owned by no sequence, that must stay poisoned; the inputs (q, k, v, out,
// dout, lse) must come back byte-identical. Rows that see no key must get exactly dQ = 0, keys no
// query sees exactly dK = dV = 0. The deterministic mode must be bitwise reproducible over 20 runs
// and agree with the atomic mode. Without a usable sm80+ GPU every test is skipped (CI).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing.h"
#include "core/mask.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"
#include "ref/standard.h"

namespace fa_test {
namespace {

#define CUDA_OK(call)                                                      \
  do {                                                                     \
    const cudaError_t e_ = (call);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_); \
  } while (0)

bool gpu_present() {
  static const bool ok = flashattn::cuda_available();
  return ok;
}

#define SKIP_WITHOUT_GPU() \
  if (!gpu_present()) GTEST_SKIP() << "no sm80+ CUDA device: GPU tests skipped"

// ---- device buffers with guard bands --------------------------------------------------------
// `numel` elements of `esize` bytes plus kGuard bytes on both sides, all set by fill(); the
// host-side byte image (guards included) is what checks compare.
class DeviceBuffer {
 public:
  static constexpr size_t kGuard = 512;  // bytes, a multiple of 16 (keeps data 16-byte aligned)

  DeviceBuffer(size_t esize, int64_t numel) : esize_(esize) {
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
  size_t element_byte(int64_t offset) const { return kGuard + size_t(offset) * esize_; }

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

 private:
  size_t esize_;
  size_t bytes_ = 0;
  void* raw_ = nullptr;
};

// ---- layouts ----------------------------------------------------------------------------------
enum class GpuLayout { dense, bhsd };  // bhsd: (b, h, s, d + 8) in memory, viewed as (b, s, h, d)
enum class Slopes { none, heads, batch_heads };

struct Placed {
  std::vector<int64_t> shape, stride;
  int64_t numel = 0;
};

// A (b, s, h, d) tensor (varlen: (s, h, d), s = packed rows) in `layout`.
Placed place(int64_t b, int64_t s, int64_t h, int64_t d, GpuLayout layout, bool varlen) {
  Placed p;
  if (layout == GpuLayout::dense) {
    p.shape = varlen ? std::vector<int64_t>{s, h, d} : std::vector<int64_t>{b, s, h, d};
    p.stride = varlen ? std::vector<int64_t>{h * d, d, 1} : std::vector<int64_t>{s * h * d, h * d, d, 1};
    p.numel = b * s * h * d;
    return p;
  }
  const int64_t dp = d + 8;  // a gap of 8 elements after each row: must stay untouched
  p.shape = varlen ? std::vector<int64_t>{s, h, d} : std::vector<int64_t>{b, s, h, d};
  p.stride = varlen ? std::vector<int64_t>{dp, s * dp, 1} : std::vector<int64_t>{h * s * dp, dp, s * dp, 1};
  p.numel = b * h * s * dp;
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

// fn(n, offset) for every element, n the logical row-major index.
template <typename Fn>
void for_each_placed(const Placed& p, Fn fn) {
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

uint16_t to_bits(DType t, float v) { return t == DType::bf16 ? float_to_bf16_bits(v) : float_to_f16_bits(v); }
double from_bits(DType t, uint16_t b) { return t == DType::bf16 ? bf16_bits_to_float(b) : f16_bits_to_float(b); }

// ---- one problem ------------------------------------------------------------------------------
struct Case {
  std::string name;
  int batch = 1, sq = 1, sk = 1, heads = 1, heads_k = 1, d = 64, dv = 0;
  DType dtype = DType::bf16;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0;
  Slopes alibi = Slopes::none;
  std::optional<float> scale;
  bool deterministic = false;
  bool small_tiles = false;  // FLASHATTN_CUDA_SMALL_TILES=1: the sm80 (163 KB smem) tiles on sm90 too
  GpuLayout layout = GpuLayout::dense;
  std::vector<int> lens_q, lens_k;  // varlen when non-empty (batch = lens_q.size())

  int head_dim_v() const { return dv ? dv : d; }
  bool varlen() const { return !lens_q.empty(); }
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// The sm80 kernel's small tiles (FLASHATTN_CUDA_SMALL_TILES) on the sm80 kernel
// (FLASHATTN_CUDA_BACKWARD=sm80) for its lifetime, when on.
class SmallTiles {
 public:
  explicit SmallTiles(bool on)
      : knobs_([on](flashattn::Knobs& k) {
          if (!on) return;
          k.cuda_small_tiles = true;
          k.cuda_backward = flashattn::KernelChoice::kSm80;
        }) {}

 private:
  ScopedKnobs knobs_;
};

// Inputs on the device and the host, our forward's out/lse on the device, and the gradients of
// the last backward() read back.
class BwdProblem {
 public:
  explicit BwdProblem(const Case& c) : c_(c) {}

  // Random inputs (never zeros) uploaded in the case's layout, then our CUDA forward.
  ::testing::AssertionResult setup() {
    const Case& c = c_;
    const bool vl = c.varlen();
    const int dv = c.head_dim_v();
    Rng rng(test_seed(c.name));
    cu_q_ = {0};
    cu_k_ = {0};
    rows_q_ = int64_t(c.batch) * c.sq;
    rows_k_ = int64_t(c.batch) * c.sk;
    if (vl) {  // packed rows: the sequences, then 3 rows owned by none
      for (size_t i = 0; i < c.lens_q.size(); ++i) {
        cu_q_.push_back(cu_q_.back() + c.lens_q[i]);
        cu_k_.push_back(cu_k_.back() + c.lens_k[i]);
      }
      rows_q_ = cu_q_.back() + 3;
      rows_k_ = cu_k_.back() + 3;
    }
    const int64_t b = vl ? 1 : c.batch, sq = vl ? rows_q_ : c.sq, sk = vl ? rows_k_ : c.sk;
    pq_ = place(b, sq, c.heads, c.d, c.layout, vl);
    pk_ = place(b, sk, c.heads_k, c.d, c.layout, vl);
    pv_ = place(b, sk, c.heads_k, dv, c.layout, vl);
    po_ = place(b, sq, c.heads, dv, c.layout, vl);
    if (vl) {
      pl_.shape = {c.heads, rows_q_};
      pl_.stride = {rows_q_, 1};
    } else {
      pl_.shape = {c.batch, c.heads, c.sq};
      pl_.stride = {int64_t(c.heads) * c.sq, c.sq, 1};
    }
    pl_.numel = int64_t(c.heads) * rows_q_;

    // At least one element: an empty problem's host views still need a data pointer.
    auto random_bits = [&](int64_t n) {
      std::vector<uint16_t> v(size_t(std::max<int64_t>(n, 1)));
      for (auto& x : v) x = to_bits(c.dtype, float(rng.normal()));
      return v;
    };
    hq_ = random_bits(rows_q_ * c.heads * c.d);
    hk_ = random_bits(rows_k_ * c.heads_k * c.d);
    hv_ = random_bits(rows_k_ * c.heads_k * dv);
    hdo_ = random_bits(rows_q_ * c.heads * dv);
    if (c.alibi != Slopes::none) {
      const int nb = c.alibi == Slopes::batch_heads ? c.batch : 1;
      for (int bb = 0; bb < nb; ++bb)
        for (int h = 0; h < c.heads; ++h) slopes_.push_back(float(std::pow(2.0, -8.0 * (h + 1) / c.heads) * (1 + bb)));
    }

    gq_.emplace(2, pq_.numel);
    gk_.emplace(2, pk_.numel);
    gv_.emplace(2, pv_.numel);
    gdo_.emplace(2, po_.numel);
    go_.emplace(2, po_.numel);
    gl_.emplace(4, pl_.numel);
    gcu_q_.emplace(4, int64_t(cu_q_.size()));
    gcu_k_.emplace(4, int64_t(cu_k_.size()));
    gslopes_.emplace(4, int64_t(slopes_.size()));
    gdq_.emplace(2, pq_.numel);
    gdk_.emplace(2, pk_.numel);
    gdv_.emplace(2, pv_.numel);
    for (auto* g : {&gq_, &gk_, &gv_, &gdo_, &go_, &gl_, &gcu_q_, &gcu_k_, &gslopes_, &gdq_, &gdk_, &gdv_})
      if (!(*g)->ok()) return ::testing::AssertionFailure() << "cudaMalloc failed";

    // Inputs in the case's layout; gaps hold 1.0, which a wrong read would show.
    const uint32_t one = c.dtype == DType::bf16 ? 0x3F80u : 0x3C00u;
    auto upload = [&](DeviceBuffer& g, const Placed& p, const std::vector<uint16_t>& dense) {
      auto bytes = g.pattern_bytes(one);
      for_each_placed(p, [&](int64_t n, int64_t off) { std::memcpy(&bytes[g.element_byte(off)], &dense[n], 2); });
      return g.upload(bytes);
    };
    if (!upload(*gq_, pq_, hq_) || !upload(*gk_, pk_, hk_) || !upload(*gv_, pv_, hv_) ||
        !upload(*gdo_, po_, hdo_))
      return ::testing::AssertionFailure() << "upload failed";
    auto upload_raw = [](DeviceBuffer& g, const void* src, size_t bytes) {
      return bytes == 0 || cudaMemcpy(g.data(), src, bytes, cudaMemcpyHostToDevice) == cudaSuccess;
    };
    if (!upload_raw(*gcu_q_, cu_q_.data(), cu_q_.size() * 4) || !upload_raw(*gcu_k_, cu_k_.data(), cu_k_.size() * 4) ||
        !upload_raw(*gslopes_, slopes_.data(), slopes_.size() * 4))
      return ::testing::AssertionFailure() << "upload failed";

    // out / lse poisoned, then our forward.
    if (!go_->upload(go_->pattern_bytes(0x7FC1u)) || !gl_->upload(gl_->pattern_bytes(0x7FC00001u)))
      return ::testing::AssertionFailure() << "upload failed";
    opt_.causal = c.causal;
    opt_.window_left = c.wl;
    opt_.window_right = c.wr;
    opt_.softcap = c.softcap;
    opt_.softmax_scale = c.scale;
    const Device dev = Device::cuda(0);
    if (c.alibi == Slopes::heads)
      opt_.alibi_slopes = Tensor::contiguous(gslopes_->data(), DType::f32, {c.heads}, dev);
    else if (c.alibi == Slopes::batch_heads)
      opt_.alibi_slopes = Tensor::contiguous(gslopes_->data(), DType::f32, {c.batch, c.heads}, dev);
    if (vl) {
      layout_.cu_seqlens_q = Tensor::contiguous(gcu_q_->data(), DType::i32, {int64_t(cu_q_.size())}, dev);
      layout_.cu_seqlens_k = Tensor::contiguous(gcu_k_->data(), DType::i32, {int64_t(cu_k_.size())}, dev);
      layout_.max_seqlen_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
      layout_.max_seqlen_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
    }
    SmallTiles small(c.small_tiles);
    auto r = runs("forward", [&] {
      if (vl)
        flashattn::forward_varlen(tq(), tk(), tv(), to(), tl(), layout_, opt_);
      else
        flashattn::forward(tq(), tk(), tv(), to(), tl(), opt_);
    });
    if (!r) return r;
    if (cudaDeviceSynchronize() != cudaSuccess) return ::testing::AssertionFailure() << "forward: CUDA error";
    inputs_before_ = {gq_->download(), gk_->download(), gv_->download(), gdo_->download(), go_->download(),
                      gl_->download()};
    return ::testing::AssertionSuccess();
  }

  // Poisoned gradients, our backward, then: nothing written outside the gradient views (guards,
  // gaps, unowned varlen rows), inputs untouched; the gradients read back (dense, owned rows).
  ::testing::AssertionResult backward(bool deterministic, void* stream = nullptr) {
    const Case& c = c_;
    const auto dq_before = gdq_->pattern_bytes(0x7FC1u), dk_before = gdk_->pattern_bytes(0x7FC1u),
               dv_before = gdv_->pattern_bytes(0x7FC1u);
    if (!gdq_->upload(dq_before) || !gdk_->upload(dk_before) || !gdv_->upload(dv_before))
      return ::testing::AssertionFailure() << "upload failed";
    Options o = opt_;
    o.deterministic = deterministic;
    o.stream = stream;
    SmallTiles small(c.small_tiles);
    auto r = runs("backward", [&] {
      kernel = flashattn::cuda::backward_kernel(flashattn::core::check_backward(
          tdo(), tq(), tk(), tv(), to(), tl(), tdq(), tdk(), tdv(), o, c.varlen() ? &layout_ : nullptr));
      if (c.varlen())
        flashattn::backward_varlen(tdo(), tq(), tk(), tv(), to(), tl(), tdq(), tdk(), tdv(), layout_, o);
      else
        flashattn::backward(tdo(), tq(), tk(), tv(), to(), tl(), tdq(), tdk(), tdv(), o);
    });
    if (!r) return r;
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) return ::testing::AssertionFailure() << "backward: " << cudaGetErrorString(err);

    const std::vector<std::vector<uint8_t>> inputs_after = {gq_->download(), gk_->download(), gv_->download(),
                                                            gdo_->download(), go_->download(), gl_->download()};
    const char* names[] = {"q", "k", "v", "dout", "out", "lse"};
    for (size_t i = 0; i < inputs_after.size(); ++i)
      if (inputs_after[i] != inputs_before_[i])
        return ::testing::AssertionFailure() << "the backward modified its input " << names[i];

    const int64_t used_q = c.varlen() ? cu_q_.back() : rows_q_;
    const int64_t used_k = c.varlen() ? cu_k_.back() : rows_k_;
    auto read = [&](const DeviceBuffer& g, const Placed& p, const std::vector<uint8_t>& before, int heads, int dim,
                    int64_t used_rows, std::vector<double>& dense, std::vector<uint8_t>& raw, const char* what) {
      raw = g.download();
      if (raw.empty()) return ::testing::AssertionFailure() << "download failed";
      std::vector<uint8_t> touched(raw.size(), 0);
      dense.clear();
      for_each_placed(p, [&](int64_t n, int64_t off) {
        if (n / (int64_t(heads) * dim) >= used_rows) return;  // unowned varlen rows stay poisoned
        uint16_t bits;
        std::memcpy(&bits, &raw[g.element_byte(off)], 2);
        touched[g.element_byte(off)] = touched[g.element_byte(off) + 1] = 1;
        dense.push_back(from_bits(c.dtype, bits));
      });
      int64_t stray = 0;
      for (size_t i = 0; i < raw.size(); ++i) stray += !touched[i] && raw[i] != before[i];
      if (stray)
        return ::testing::AssertionFailure() << stray << " bytes of " << what
                                             << " written outside its view (gaps, guards, unowned rows)";
      return ::testing::AssertionSuccess();
    };
    const int dv = c.head_dim_v();
    if (auto a = read(*gdq_, pq_, dq_before, c.heads, c.d, used_q, dq, raw_dq, "dq"); !a) return a;
    if (auto a = read(*gdk_, pk_, dk_before, c.heads_k, c.d, used_k, dk, raw_dk, "dk"); !a) return a;
    if (auto a = read(*gdv_, pv_, dv_before, c.heads_k, dv, used_k, dvv, raw_dv, "dv"); !a) return a;
    return ::testing::AssertionSuccess();
  }

  // The fp64 oracle on host copies, restricted to the owned rows.
  ref::BackwardResult oracle() const {
    const Case& c = c_;
    HostViews h = host_views();
    auto r = ref::backward(h.dout, h.q, h.k, h.v, h.opt, c.varlen() ? &h.layout : nullptr);
    const int64_t used_q = c.varlen() ? cu_q_.back() : rows_q_;
    r.dq.resize(size_t(used_q * c.heads * c.d));
    return r;
  }

  // The standard attention (forward + backward in the input dtype), per sequence for varlen.
  struct Base {
    std::vector<double> dq, dk, dv;
  };
  ::testing::AssertionResult baseline(Base& base) const {
    const Case& c = c_;
    const int dv = c.head_dim_v();
    const bool vl = c.varlen();
    const int64_t used_q = vl ? cu_q_.back() : rows_q_, used_k = vl ? cu_k_.back() : rows_k_;
    base.dq.assign(size_t(used_q * c.heads * c.d), 0.0);
    base.dk.assign(size_t(used_k * c.heads_k * c.d), 0.0);
    base.dv.assign(size_t(used_k * c.heads_k * dv), 0.0);
    HostViews hv = host_views();
    auto run = [&](int64_t q0, int64_t k0, int64_t nb, int64_t lq, int64_t lk, int b_slopes) {
      if (lq == 0 || lk == 0) return ::testing::AssertionSuccess();  // dQ = 0 / dK = dV = 0 as set
      auto* qd = const_cast<uint16_t*>(hq_.data()) + q0 * c.heads * c.d;
      auto* kd = const_cast<uint16_t*>(hk_.data()) + k0 * c.heads_k * c.d;
      auto* vd = const_cast<uint16_t*>(hv_.data()) + k0 * c.heads_k * dv;
      auto* dod = const_cast<uint16_t*>(hdo_.data()) + q0 * c.heads * dv;
      const Tensor q = Tensor::contiguous(qd, c.dtype, {nb, lq, c.heads, c.d});
      const Tensor k = Tensor::contiguous(kd, c.dtype, {nb, lk, c.heads_k, c.d});
      const Tensor v = Tensor::contiguous(vd, c.dtype, {nb, lk, c.heads_k, dv});
      const Tensor d_o = Tensor::contiguous(dod, c.dtype, {nb, lq, c.heads, dv});
      std::vector<uint16_t> o(size_t(nb * lq * c.heads * dv)), gq(size_t(nb * lq * c.heads * c.d)),
          gk(size_t(nb * lk * c.heads_k * c.d)), gv(size_t(nb * lk * c.heads_k * dv));
      std::vector<float> l(size_t(nb * c.heads * lq));
      const Tensor to = Tensor::contiguous(o.data(), c.dtype, {nb, lq, c.heads, dv});
      const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {nb, c.heads, lq});
      const Tensor tgq = Tensor::contiguous(gq.data(), c.dtype, {nb, lq, c.heads, c.d});
      const Tensor tgk = Tensor::contiguous(gk.data(), c.dtype, {nb, lk, c.heads_k, c.d});
      const Tensor tgv = Tensor::contiguous(gv.data(), c.dtype, {nb, lk, c.heads_k, dv});
      Options o2 = hv.opt;
      std::vector<float> seq_slopes;
      if (vl && c.alibi == Slopes::batch_heads) {  // this sequence's row of the (batch, heads) slopes
        seq_slopes.assign(slopes_.begin() + b_slopes * c.heads, slopes_.begin() + (b_slopes + 1) * c.heads);
        o2.alibi_slopes = Tensor::contiguous(seq_slopes.data(), DType::f32, {c.heads});
      }
      auto r = runs("standard attention (baseline)", [&] {
        flashattn::standard::forward(q, k, v, to, tl, o2);
        flashattn::standard::backward(d_o, q, k, v, to, tl, tgq, tgk, tgv, o2);
      });
      if (!r) return r;
      for (size_t i = 0; i < gq.size(); ++i) base.dq[size_t(q0 * c.heads * c.d) + i] = from_bits(c.dtype, gq[i]);
      for (size_t i = 0; i < gk.size(); ++i) base.dk[size_t(k0 * c.heads_k * c.d) + i] = from_bits(c.dtype, gk[i]);
      for (size_t i = 0; i < gv.size(); ++i) base.dv[size_t(k0 * c.heads_k * dv) + i] = from_bits(c.dtype, gv[i]);
      return r;
    };
    if (!vl) return run(0, 0, c.batch, c.sq, c.sk, 0);
    for (size_t b = 0; b < c.lens_q.size(); ++b)
      if (auto r = run(cu_q_[b], cu_k_[b], 1, c.lens_q[b], c.lens_k[b], int(b)); !r) return r;
    return ::testing::AssertionSuccess();
  }

  // Exact zeros where nothing flows: dQ of rows that see no key, dK/dV of keys no row sees.
  ::testing::AssertionResult empty_rows_and_keys_exact() const {
    const Case& c = c_;
    const int dv = c.head_dim_v();
    const bool vl = c.varlen();
    int64_t rows_checked = 0, keys_checked = 0;
    for (int b = 0; b < (vl ? int(c.lens_q.size()) : c.batch); ++b) {
      const int64_t lq = vl ? c.lens_q[b] : c.sq, lk = vl ? c.lens_k[b] : c.sk;
      const int64_t q0 = vl ? cu_q_[b] : int64_t(b) * c.sq, k0 = vl ? cu_k_[b] : int64_t(b) * c.sk;
      const int64_t wr = c.causal ? 0 : c.wr;
      const flashattn::Mask mask{lq, lk, c.wl, wr};
      std::vector<char> key_seen(size_t(lk), 0);
      for (int64_t i = 0; i < lq; ++i) {
        for (int64_t j = mask.key_begin(i); j < mask.key_end(i); ++j) key_seen[size_t(j)] = 1;
        if (mask.key_begin(i) < mask.key_end(i)) continue;
        ++rows_checked;
        for (int h = 0; h < c.heads; ++h)
          for (int x = 0; x < c.d; ++x)
            if (dq[size_t(((q0 + i) * c.heads + h) * c.d + x)] != 0.0)
              return ::testing::AssertionFailure() << "row " << i << " of sequence " << b << " sees no key, but dQ["
                                                   << h << "][" << x << "] = " << dq[size_t(((q0 + i) * c.heads + h) * c.d + x)];
      }
      for (int64_t j = 0; j < lk; ++j) {
        if (key_seen[size_t(j)]) continue;
        ++keys_checked;
        for (int h = 0; h < c.heads_k; ++h) {
          for (int x = 0; x < c.d; ++x)
            if (dk[size_t(((k0 + j) * c.heads_k + h) * c.d + x)] != 0.0)
              return ::testing::AssertionFailure() << "key " << j << " of sequence " << b << " is seen by no row, but dK = "
                                                   << dk[size_t(((k0 + j) * c.heads_k + h) * c.d + x)];
          for (int x = 0; x < dv; ++x)
            if (dvv[size_t(((k0 + j) * c.heads_k + h) * dv + x)] != 0.0)
              return ::testing::AssertionFailure() << "key " << j << " of sequence " << b << " is seen by no row, but dV = "
                                                   << dvv[size_t(((k0 + j) * c.heads_k + h) * dv + x)];
        }
      }
    }
    return ::testing::AssertionSuccess() << rows_checked << " empty rows, " << keys_checked << " unseen keys";
  }

  const Case& config() const { return c_; }

  // The last backward's gradients: dense over owned rows, and the raw device bytes.
  std::vector<double> dq, dk, dvv;
  std::vector<uint8_t> raw_dq, raw_dk, raw_dv;
  std::string kernel;  // the main kernel the last backward() ran (cuda::backward_kernel)

 private:
  struct HostViews {
    Tensor q, k, v, dout;
    Options opt;
    flashattn::VarlenLayout layout;
    std::vector<int32_t> cu_q, cu_k;
  };
  HostViews host_views() const {
    const Case& c = c_;
    const int dv = c.head_dim_v();
    HostViews h;
    auto* q = const_cast<uint16_t*>(hq_.data());
    auto* k = const_cast<uint16_t*>(hk_.data());
    auto* v = const_cast<uint16_t*>(hv_.data());
    auto* d_o = const_cast<uint16_t*>(hdo_.data());
    if (c.varlen()) {
      h.q = Tensor::contiguous(q, c.dtype, {rows_q_, c.heads, c.d});
      h.k = Tensor::contiguous(k, c.dtype, {rows_k_, c.heads_k, c.d});
      h.v = Tensor::contiguous(v, c.dtype, {rows_k_, c.heads_k, dv});
      h.dout = Tensor::contiguous(d_o, c.dtype, {rows_q_, c.heads, dv});
    } else {
      h.q = Tensor::contiguous(q, c.dtype, {c.batch, c.sq, c.heads, c.d});
      h.k = Tensor::contiguous(k, c.dtype, {c.batch, c.sk, c.heads_k, c.d});
      h.v = Tensor::contiguous(v, c.dtype, {c.batch, c.sk, c.heads_k, dv});
      h.dout = Tensor::contiguous(d_o, c.dtype, {c.batch, c.sq, c.heads, dv});
    }
    h.opt = opt_;
    auto* s = const_cast<float*>(slopes_.data());
    if (c.alibi == Slopes::heads) h.opt.alibi_slopes = Tensor::contiguous(s, DType::f32, {c.heads});
    if (c.alibi == Slopes::batch_heads) h.opt.alibi_slopes = Tensor::contiguous(s, DType::f32, {c.batch, c.heads});
    if (c.varlen()) {
      h.layout.cu_seqlens_q = Tensor::contiguous(const_cast<int32_t*>(cu_q_.data()), DType::i32, {int64_t(cu_q_.size())});
      h.layout.cu_seqlens_k = Tensor::contiguous(const_cast<int32_t*>(cu_k_.data()), DType::i32, {int64_t(cu_k_.size())});
      h.layout.max_seqlen_q = layout_.max_seqlen_q;
      h.layout.max_seqlen_k = layout_.max_seqlen_k;
    }
    return h;
  }

  Tensor tq() const { return make_tensor(gq_->data(), c_.dtype, pq_, Device::cuda(0)); }
  Tensor tk() const { return make_tensor(gk_->data(), c_.dtype, pk_, Device::cuda(0)); }
  Tensor tv() const { return make_tensor(gv_->data(), c_.dtype, pv_, Device::cuda(0)); }
  Tensor tdo() const { return make_tensor(gdo_->data(), c_.dtype, po_, Device::cuda(0)); }
  Tensor to() const { return make_tensor(go_->data(), c_.dtype, po_, Device::cuda(0)); }
  Tensor tl() const { return make_tensor(gl_->data(), DType::f32, pl_, Device::cuda(0)); }
  Tensor tdq() const { return make_tensor(gdq_->data(), c_.dtype, pq_, Device::cuda(0)); }
  Tensor tdk() const { return make_tensor(gdk_->data(), c_.dtype, pk_, Device::cuda(0)); }
  Tensor tdv() const { return make_tensor(gdv_->data(), c_.dtype, pv_, Device::cuda(0)); }

  Case c_;
  Options opt_;
  flashattn::VarlenLayout layout_;
  int64_t rows_q_ = 0, rows_k_ = 0;
  std::vector<int32_t> cu_q_, cu_k_;
  std::vector<uint16_t> hq_, hk_, hv_, hdo_;
  std::vector<float> slopes_;
  Placed pq_, pk_, pv_, po_, pl_;
  std::optional<DeviceBuffer> gq_, gk_, gv_, gdo_, go_, gl_, gcu_q_, gcu_k_, gslopes_, gdq_, gdk_, gdv_;
  std::vector<std::vector<uint8_t>> inputs_before_;
};

// The whole check of one case: backward, then the oracle rule for dQ, dK, dV and exact zeros.
void check_case(const Case& c) {
  BwdProblem prob(c);
  ASSERT_TRUE(prob.setup());
  ASSERT_TRUE(prob.backward(c.deterministic));
  SCOPED_TRACE("kernel: " + prob.kernel);
  ::testing::Test::RecordProperty("kernel", prob.kernel);
  const auto ref = prob.oracle();
  BwdProblem::Base base;
  ASSERT_TRUE(prob.baseline(base));
  ASSERT_EQ(prob.dq.size(), ref.dq.size());
  ASSERT_EQ(prob.dk.size(), ref.dk.size());
  ASSERT_EQ(prob.dvv.size(), ref.dv.size());
  EXPECT_TRUE(close("dQ", c.dtype, prob.dq, &base.dq, ref.dq));
  EXPECT_TRUE(close("dK", c.dtype, prob.dk, &base.dk, ref.dk));
  EXPECT_TRUE(close("dV", c.dtype, prob.dvv, &base.dv, ref.dv));
  EXPECT_TRUE(prob.empty_rows_and_keys_exact());
}

std::string case_name(const Case& c) {
  std::ostringstream n;
  n << "d" << c.d << (c.dv && c.dv != c.d ? "_dv" + std::to_string(c.dv) : "") << "_sq" << c.sq << "_sk" << c.sk
    << "_b" << c.batch << "_h" << c.heads << "_" << c.heads_k << (c.dtype == DType::bf16 ? "_bf16" : "_fp16")
    << (c.causal ? "_causal" : "") << (c.wl >= 0 || c.wr >= 0 ? "_win" : "") << (c.softcap > 0 ? "_softcap" : "")
    << (c.alibi == Slopes::heads ? "_alibi" : c.alibi == Slopes::batch_heads ? "_alibibh" : "")
    << (c.layout == GpuLayout::bhsd ? "_bhsd" : "") << (c.deterministic ? "_det" : "")
    << (c.small_tiles ? "_smalltiles" : "");
  return n.str();
}

// ---- the case list ----------------------------------------------------------------------------
// Every seqlen of {1, 7, 63, 64, 65, 113, 127, 128, 129, 1000, 1013} and every head dim of
// {32, 40, 64, 80, 96, 128, 192, 256} appears, with sq != sk both ways, GQA 1/2/8, both dtypes,
// each mask and score modifier, strided layouts, deterministic mode, A100's tiles, and varlen
// batches with empty sequences.
std::vector<Case> grid() {
  std::vector<Case> v;
  const int dims[] = {32, 40, 64, 80, 96, 128, 192, 256};
  const int seqs[] = {1, 7, 63, 64, 65, 113, 127, 128, 129, 1000, 1013};
  const int n_seq = 11;
  int k = 0;
  for (int di = 0; di < 8; ++di) {
    for (int rep = 0; rep < 3; ++rep, ++k) {
      Case c;
      c.d = dims[di];
      c.sq = seqs[(k * 5) % n_seq];
      c.sk = seqs[(k * 7 + 3) % n_seq];
      if (c.sq >= 1000 && c.sk >= 1000) c.sk = 129;
      c.dtype = k % 2 ? DType::f16 : DType::bf16;
      const int ratio = (k % 3 == 0) ? 1 : (k % 3 == 1 ? 2 : 8);
      c.heads = 8;
      c.heads_k = 8 / ratio;
      if (int64_t(c.sq) * c.sk > 60000) c.heads = ratio == 8 ? 8 : 2, c.heads_k = c.heads / std::min(ratio, c.heads);
      c.batch = int64_t(c.sq) * c.sk < 5000 ? 3 : 1;
      switch (k % 6) {
        case 0: break;
        case 1: c.causal = true; break;
        case 2: c.wl = 37; c.wr = 11; break;
        case 3: c.causal = true; c.softcap = 15.0f; break;
        case 4: c.alibi = Slopes::heads; break;
        case 5: c.causal = true; c.alibi = Slopes::batch_heads; c.wl = 70; break;
      }
      c.layout = k % 4 == 3 ? GpuLayout::bhsd : GpuLayout::dense;
      c.deterministic = k % 5 == 4;
      c.name = case_name(c);
      v.push_back(c);
    }
  }
  auto add = [&](Case c, const char* name = nullptr) {
    c.name = name ? std::string(name) : case_name(c);
    v.push_back(c);
  };
  // The head dims the benchmark uses, long on both sides (many key blocks per query block).
  for (int d : {64, 128})
    for (bool causal : {false, true}) {
      Case c;
      c.d = d;
      c.sq = c.sk = 1013;
      c.heads = 2;
      c.heads_k = 1;
      c.causal = causal;
      add(c);
    }
  for (int d : {96, 192, 256}) {  // the other tiles over many blocks
    Case c;
    c.d = d;
    c.sq = 1000;
    c.sk = 1013;
    c.heads = 2;
    c.heads_k = 2;
    c.causal = d != 192;
    c.dtype = d == 192 ? DType::f16 : DType::bf16;
    add(c);
  }
  for (int d : {64, 128, 192, 256})  // A100's tiles (64 query rows; one Q/dO stage for d > 96) on any GPU
    for (bool causal : {false, true}) {
      Case c;
      c.d = d;
      c.sq = 257;
      c.sk = 1000;
      c.heads = 2;
      c.heads_k = 1;
      c.causal = causal;
      c.small_tiles = true;
      c.dtype = causal ? DType::f16 : DType::bf16;
      add(c);
    }
  {  // sq > sk with causal: the first sq - sk rows see nothing (dQ = 0 exactly)
    Case c;
    c.d = 64;
    c.sq = 129;
    c.sk = 63;
    c.heads = 4;
    c.heads_k = 2;
    c.causal = true;
    c.dtype = DType::f16;
    add(c, "causal_sq_gt_sk_empty_rows");
  }
  {  // a window that leaves rows and keys unseen in both directions
    Case c;
    c.d = 128;
    c.sq = 200;
    c.sk = 65;
    c.heads = 2;
    c.heads_k = 1;
    c.wl = 3;
    c.wr = 0;
    add(c, "window_empty_rows");
    c.sq = 7;
    c.sk = 300;
    c.wl = 0;
    c.wr = 0;
    add(c, "window_unseen_keys");
  }
  {  // keys no query sees under causal (sq < sk, window): dK = dV = 0 there
    Case c;
    c.d = 64;
    c.sq = 113;
    c.sk = 1000;
    c.heads = 2;
    c.heads_k = 2;
    c.wl = 50;
    c.wr = 0;
    c.deterministic = true;
    add(c, "causal_window_unseen_keys_det");
  }
  // The sm90 backward's tiles (128 keys per CTA, 64 or 128 queries per step) over many blocks:
  // GQA with query blocks that cut the diagonal, a two-sided window, padded head dims, sq > sk.
  {
    Case c;
    c.d = 128;
    c.sq = 300;
    c.sk = 777;
    c.heads = 8;
    c.heads_k = 2;
    c.causal = true;
    c.layout = GpuLayout::bhsd;
    add(c, "multiblock_d128_gqa4_causal_bhsd");
    c.d = 64;
    c.sq = c.sk = 700;
    c.heads = c.heads_k = 4;
    c.causal = false;
    c.wl = 100;
    c.wr = 50;
    c.dtype = DType::f16;
    c.layout = GpuLayout::dense;
    add(c, "multiblock_d64_window_fp16");
    c.d = 96;
    c.sq = 513;
    c.sk = 250;
    c.heads = 4;
    c.heads_k = 1;
    c.wl = c.wr = -1;
    c.causal = true;
    c.dtype = DType::bf16;
    add(c, "multiblock_d96_causal_sq_gt_sk_mqa");
    c.d = 32;
    c.sq = 1000;
    c.sk = 1000;
    c.heads = c.heads_k = 2;
    c.causal = false;
    add(c, "multiblock_d32");
  }
  for (float scale : {-0.2f, 0.5f}) {  // an explicit scale, a negative one too
    Case c;
    c.d = 64;
    c.sq = 65;
    c.sk = 129;
    c.heads = 2;
    c.heads_k = 1;
    c.causal = scale > 0;
    c.scale = scale;
    add(c, scale < 0 ? "negative_scale" : "scale_0_5_causal");
  }
  {  // softcap with a scale of 1 (large scores: the tanh derivative matters), sq > sk
    Case c;
    c.d = 96;
    c.sq = 129;
    c.sk = 65;
    c.heads = 2;
    c.heads_k = 1;
    c.softcap = 30.0f;
    c.scale = 1.0f;
    add(c, "softcap_30_scale_1");
  }
  {  // everything at once
    Case c;
    c.d = 64;
    c.sq = 127;
    c.sk = 129;
    c.heads = 4;
    c.heads_k = 2;
    c.causal = true;
    c.wl = 20;
    c.softcap = 2.0f;
    c.alibi = Slopes::batch_heads;
    c.scale = 0.25f;
    c.batch = 2;
    add(c, "causal_window_softcap_alibi_scale");
  }
  {  // head_dim_v != head_dim, both ways
    Case c;
    c.d = 128;
    c.dv = 64;
    c.sq = 127;
    c.sk = 129;
    c.heads = 4;
    c.heads_k = 4;
    add(c, "dv64_d128");
    c.d = 64;
    c.dv = 128;
    c.causal = true;
    c.layout = GpuLayout::bhsd;
    add(c, "dv128_d64_causal_bhsd");
  }
  {  // MQA over many heads: dK/dV sum 16 query heads in registers
    Case c;
    c.d = 128;
    c.sq = 300;
    c.sk = 257;
    c.heads = 16;
    c.heads_k = 1;
    c.causal = true;
    c.deterministic = true;
    add(c, "mqa_16_heads_det");
  }
  for (auto [sq, sk] : {std::pair{0, 7}, std::pair{7, 0}}) {  // no queries: dK = dV = 0; no keys: dQ = 0
    Case c;
    c.d = 64;
    c.sq = sq;
    c.sk = sk;
    c.batch = 2;
    c.heads = 2;
    c.heads_k = 1;
    add(c, sq == 0 ? "no_queries" : "no_keys");
  }
  // Varlen with zero-length sequences (q, k or both), GQA, causal, window, strided, deterministic.
  {
    Case c;
    c.lens_q = {65, 0, 1, 129, 7, 0, 300};
    c.lens_k = {65, 10, 0, 129, 63, 0, 1013};
    c.batch = int(c.lens_q.size());
    c.heads = 8;
    c.heads_k = 2;
    c.d = 128;
    c.causal = true;
    add(c, "varlen_bf16_causal_gqa");
    c.deterministic = true;
    add(c, "varlen_bf16_causal_gqa_det");
  }
  {
    Case c;
    c.lens_q = {128, 1, 0, 64, 127};
    c.lens_k = {64, 1013, 5, 0, 200};
    c.batch = int(c.lens_q.size());
    c.heads = 4;
    c.heads_k = 4;
    c.d = 64;
    c.dtype = DType::f16;
    c.wl = 20;
    c.wr = 20;
    c.layout = GpuLayout::bhsd;
    add(c, "varlen_fp16_window_bhsd");
  }
  {
    Case c;
    c.lens_q = {33, 129, 0};
    c.lens_k = {129, 33, 7};
    c.batch = int(c.lens_q.size());
    c.heads = 8;
    c.heads_k = 1;
    c.d = 96;
    c.softcap = 20.0f;
    c.alibi = Slopes::batch_heads;
    add(c, "varlen_bf16_softcap_alibi_d96");
  }
  {
    Case c;
    c.lens_q = {113, 1000, 40};
    c.lens_k = {1000, 113, 40};
    c.batch = int(c.lens_q.size());
    c.heads = 2;
    c.heads_k = 1;
    c.d = 256;
    c.causal = true;
    c.dtype = DType::f16;
    add(c, "varlen_fp16_causal_d256");
  }
  return v;
}

class CudaBackward : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackward, MatchesOracle) {
  SKIP_WITHOUT_GPU();
  check_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Grid, CudaBackward, ::testing::ValuesIn(grid()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// ---- which kernel runs --------------------------------------------------------------------------
// On an H100 (builds with the 90a arch and head dims 64, 128) the sm90 backward takes the
// fixed-length calls with head dims up to 128; the rest, and every call under
// FLASHATTN_CUDA_BACKWARD=sm80, run on the sm80 kernel.
bool expect_sm90_backward() {
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

TEST(CudaBackwardDispatch, Sm90TakesCoveredCallsOnHopper) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90_backward()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  auto kernel_of = [](const Case& c, flashattn::KernelChoice force) {
    BwdProblem prob(c);
    EXPECT_TRUE(prob.setup());
    ScopedKnobs knobs([force](flashattn::Knobs& k) { k.cuda_backward = force; });
    EXPECT_TRUE(prob.backward(c.deterministic));
    return prob.kernel;
  };
  auto starts_with = [](const std::string& s, const char* p) { return s.rfind(p, 0) == 0; };
  Case c;
  c.sq = 130;
  c.sk = 200;
  c.heads = 4;
  c.heads_k = 2;
  for (int d : {32, 64, 96, 128})
    for (bool causal : {false, true}) {
      c.d = d;
      c.causal = causal;
      c.dtype = causal ? DType::f16 : DType::bf16;
      const std::string k = kernel_of(c, flashattn::KernelChoice::kAuto);
      EXPECT_TRUE(starts_with(k, "flash_bwd_sm90")) << "d " << d << (causal ? " causal" : "") << ": " << k;
      const std::string k80 = kernel_of(c, flashattn::KernelChoice::kSm80);
      EXPECT_TRUE(starts_with(k80, "flash_bwd_sm80")) << "FLASHATTN_CUDA_BACKWARD=sm80 must pick sm80: " << k80;
    }
  // The deterministic mode and softcap / ALiBi run on sm90 too; head dims above 128 do not (yet).
  c.d = 64;
  c.causal = false;
  Case det = c, softcap = c, alibi = c, wide = c;
  det.deterministic = true;
  softcap.softcap = 10.0f;
  alibi.alibi = Slopes::heads;
  wide.d = 192;
  for (const Case& u : {det, softcap, alibi})
    EXPECT_TRUE(starts_with(kernel_of(u, flashattn::KernelChoice::kAuto), "flash_bwd_sm90")) << kernel_of(u, flashattn::KernelChoice::kAuto);
  EXPECT_TRUE(starts_with(kernel_of(wide, flashattn::KernelChoice::kAuto), "flash_bwd_sm80")) << kernel_of(wide, flashattn::KernelChoice::kAuto);
}

// ---- deterministic mode -------------------------------------------------------------------------
// 20 runs give the same bytes; dQ agrees with the atomic mode within the oracle rule (and each
// within its own bound). The problems have many key blocks per query block, so the atomic mode's
// adds do race.
std::vector<Case> determinism_cases() {
  std::vector<Case> v;
  Case c;
  c.batch = 2;
  c.sq = 1000;
  c.sk = 1013;
  c.heads = 4;
  c.heads_k = 2;
  c.d = 128;
  c.name = "d128_gqa";
  v.push_back(c);
  c.causal = true;
  c.d = 64;
  c.dtype = DType::f16;
  c.name = "d64_causal_fp16";
  v.push_back(c);
  Case w;
  w.lens_q = {300, 0, 1013, 77};
  w.lens_k = {1013, 40, 500, 77};
  w.batch = 4;
  w.heads = 4;
  w.heads_k = 1;
  w.d = 96;
  w.wl = 200;
  w.wr = 30;
  w.alibi = Slopes::heads;
  w.name = "varlen_window_alibi_d96";
  v.push_back(w);
  return v;
}

class CudaBackwardDeterministic : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackwardDeterministic, BitwiseOver20RunsAndAgreesWithAtomics) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  BwdProblem prob(c);
  ASSERT_TRUE(prob.setup());
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  ASSERT_TRUE(prob.backward(true, stream));
  const auto dq0 = prob.raw_dq, dk0 = prob.raw_dk, dv0 = prob.raw_dv;
  const auto dq_det = prob.dq;
  int differing = 0;
  for (int run = 1; run < 20; ++run) {
    ASSERT_TRUE(prob.backward(true, stream));
    differing += prob.raw_dq != dq0 || prob.raw_dk != dk0 || prob.raw_dv != dv0;
  }
  EXPECT_EQ(differing, 0) << "of 19 deterministic reruns differ from the first in some byte";
  const auto ref = prob.oracle();
  BwdProblem::Base base;
  ASSERT_TRUE(prob.baseline(base));
  EXPECT_TRUE(close("dQ (deterministic)", c.dtype, dq_det, &base.dq, ref.dq));
  ASSERT_TRUE(prob.backward(false, stream));
  EXPECT_TRUE(close("dQ (atomic)", c.dtype, prob.dq, &base.dq, ref.dq));
  EXPECT_TRUE(agree("dQ deterministic vs atomic", c.dtype, dq_det, prob.dq, &base.dq, ref.dq));
  // dK and dV never use atomics: the same bytes in both modes.
  EXPECT_TRUE(prob.raw_dk == dk0 && prob.raw_dv == dv0) << "dK/dV differ between the two modes";
  CUDA_OK(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaBackwardDeterministic, ::testing::ValuesIn(determinism_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// ---- bad input ----------------------------------------------------------------------------------
// Valid device tensors for a (1, 16, 2, 64) bf16 problem; each test breaks one thing.
struct BadInputFixture {
  DeviceBuffer q{2, 2 * 16 * 2 * 64 + 64}, k{2, 16 * 2 * 64}, v{2, 16 * 2 * 64}, o{2, 16 * 2 * 64},
      d_o{2, 16 * 2 * 64}, l{4, 2 * 16}, dq{2, 2 * 16 * 2 * 64 + 64}, dk{2, 16 * 2 * 64}, dv{2, 16 * 2 * 64};
  Device dev = Device::cuda(0);
  Tensor t(const DeviceBuffer& b, int64_t offset = 0, int64_t row_stride = 128) const {
    return Tensor::strided(static_cast<uint16_t*>(b.data()) + offset, DType::bf16, {1, 16, 2, 64},
                           {16 * row_stride, row_stride, 64, 1}, dev);
  }
  Tensor lse() const { return Tensor::contiguous(l.data(), DType::f32, {1, 2, 16}, dev); }
};

// Runs fn and expects a flashattn::Error naming `argument`.
void expect_error(const char* argument, const std::function<void()>& fn) {
  try {
    fn();
    ADD_FAILURE() << "expected flashattn::Error for '" << argument << "'";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected flashattn::Error for '" << argument << "', got: " << e.what();
  }
}

TEST(CudaBackwardErrors, MisalignedGradientPointer) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  expect_error("dq", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq, 1), f.t(f.dk),
                        f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, DoutRowStrideNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  expect_error("dout", [&] {
    flashattn::backward(f.t(f.q, 0, 132), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), f.t(f.dk),
                        f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, HeadDimNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  // Separate buffers: outputs that alias inputs would be refused first, naming another argument.
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  const Device dev = Device::cuda(0);
  auto make = [&] {
    bufs.push_back(std::make_unique<DeviceBuffer>(2, 4 * 36));
    return Tensor::contiguous(bufs.back()->data(), DType::bf16, {1, 4, 1, 36}, dev);
  };
  const Tensor dout = make(), q = make(), k = make(), v = make(), out = make(), dq = make(), dk = make(), dv = make();
  DeviceBuffer l(4, 4);
  const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  expect_error("q", [&] { flashattn::backward(dout, q, k, v, out, tl, dq, dk, dv); });
}

TEST(CudaBackwardErrors, GradientOnTheHost) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  std::vector<uint16_t> host(16 * 2 * 64);
  const Tensor dk_host = Tensor::contiguous(host.data(), DType::bf16, {1, 16, 2, 64});
  expect_error("dk", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), dk_host, f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, GradientOfTheWrongShape) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  const Tensor dv_bad = Tensor::contiguous(f.dv.data(), DType::bf16, {1, 16, 2, 32}, f.dev);
  expect_error("dv", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), f.t(f.dk), dv_bad);
  });
}

TEST(CudaBackwardErrors, Fp32IsCpuOnly) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer b(4, 4 * 64), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor x = Tensor::contiguous(b.data(), DType::f32, {1, 4, 1, 64}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  expect_error("q", [&] { flashattn::backward(x, x, x, x, x, tl, x, x, x); });
}

}  // namespace
}  // namespace fa_test
