// The backward problem of the CudaBackward suites (backward_problem.h): setup (inputs, our
// forward), backward (poisoned gradients, guards, untouched inputs), the oracle, the baseline and
// the exact zeros where no gradient flows.
#include "backward_problem.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <tuple>

#include "core/mask.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"
#include "ref/standard.h"

namespace fa_test::bwd {
namespace {

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

}  // namespace

::testing::AssertionResult BwdProblem::setup() {
  const Case& c = c_;
  const bool vl = c.varlen();
  const int dv = c.head_dim_v();
  Rng rng(test_seed(c.name));
  std::tie(cu_q_, cu_k_, rows_q_, rows_k_) = packed_rows(c);  // varlen: 3 rows owned by none at the end
  const int64_t b = vl ? 1 : c.batch, sq = vl ? rows_q_ : c.sq, sk = vl ? rows_k_ : c.sk;
  pq_ = place({b, sq, c.heads, c.d}, c.layout, vl);
  pk_ = place({b, sk, c.heads_k, c.d}, c.layout, vl);
  pv_ = place({b, sk, c.heads_k, dv}, c.layout, vl);
  po_ = place({b, sq, c.heads, dv}, c.layout, vl);
  pl_ = place_lse(c, rows_q_);

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
  if (!upload_placed(*gq_, pq_, hq_, one) || !upload_placed(*gk_, pk_, hk_, one) ||
      !upload_placed(*gv_, pv_, hv_, one) || !upload_placed(*gdo_, po_, hdo_, one))
    return ::testing::AssertionFailure() << "upload failed";
  auto upload_raw = [](DeviceBuffer& g, const void* src, size_t bytes) {
    return bytes == 0 || cudaMemcpy(g.data(), src, bytes, cudaMemcpyHostToDevice) == cudaSuccess;
  };
  if (!upload_raw(*gcu_q_, cu_q_.data(), cu_q_.size() * 4) || !upload_raw(*gcu_k_, cu_k_.data(), cu_k_.size() * 4) ||
      !upload_raw(*gslopes_, slopes_.data(), slopes_.size() * 4))
    return ::testing::AssertionFailure() << "upload failed";

  // out / lse poisoned, then our forward.
  if (!go_->upload(go_->pattern_bytes(kNan16)) || !gl_->upload(gl_->pattern_bytes(kNan32)))
    return ::testing::AssertionFailure() << "upload failed";
  opt_ = c.options();
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

::testing::AssertionResult BwdProblem::backward(bool deterministic, void* stream) {
  const Case& c = c_;
  const auto dq_before = gdq_->pattern_bytes(kNan16), dk_before = gdk_->pattern_bytes(kNan16),
             dv_before = gdv_->pattern_bytes(kNan16);
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

ref::BackwardResult BwdProblem::oracle() const {
  const Case& c = c_;
  HostViews h = host_views();
  auto r = ref::backward(h.dout, h.q, h.k, h.v, h.opt, c.varlen() ? &h.layout : nullptr);
  const int64_t used_q = c.varlen() ? cu_q_.back() : rows_q_;
  r.dq.resize(size_t(used_q * c.heads * c.d));
  return r;
}

::testing::AssertionResult BwdProblem::baseline(Base& base) const {
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

::testing::AssertionResult BwdProblem::empty_rows_and_keys_exact() const {
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

BwdProblem::HostViews BwdProblem::host_views() const {
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

}  // namespace fa_test::bwd
