// The forward oracle check of the CudaForward suites (forward_run.h): ForwardRun::run, the error
// measure against the §5 bound, and the summary of the largest errors printed at the end.
#include "forward_run.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>

#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"
#include "ref/standard.h"

namespace fa_test::fwd {
namespace {

using flashattn::KernelChoice;
using flashattn::Knobs;

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

}  // namespace

void ForwardRun::run() {
  const Case& c = c_;
  const bool varlen = c.varlen();
  const int dv = c.head_dim_v();
  std::mt19937_64 rng(seed_for(c.name));
  std::normal_distribution<double> normal(0.0, 1.0);

  // Logical sizes. Varlen: packed rows = sum of lengths plus 3 rows owned by no sequence.
  auto [cu_q, cu_k, rows_q, rows_k] = packed_rows(c);
  const int64_t bq = varlen ? 1 : c.batch, sq = varlen ? rows_q : c.sq, sk = varlen ? rows_k : c.sk;
  const Placed pq = place({bq, sq, c.heads, c.d}, c.layout, varlen);
  const Placed pk = place({bq, sk, c.heads_k, c.d}, c.layout, varlen);
  const Placed pv = place({bq, sk, c.heads_k, dv}, c.layout, varlen);
  const Placed po = place({bq, sq, c.heads, dv}, c.layout, varlen);
  const Placed pl = place_lse(c, rows_q);  // lse: (b, h, sq) or (h, total_q), dense
  const Placed dq = place({bq, sq, c.heads, c.d}, GpuLayout::dense, varlen);
  const Placed dk = place({bq, sk, c.heads_k, c.d}, GpuLayout::dense, varlen);
  const Placed dvp = place({bq, sk, c.heads_k, dv}, GpuLayout::dense, varlen);
  const Placed dop = place({bq, sq, c.heads, dv}, GpuLayout::dense, varlen);

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
  ASSERT_TRUE(upload_placed(gq, pq, hq_, in_gap));
  ASSERT_TRUE(upload_placed(gk, pk, hk_, in_gap));
  ASSERT_TRUE(upload_placed(gv, pv, hv_, in_gap));
  CUDA_OK(cudaMemcpy(gcu_q.data(), cu_q.data(), cu_q.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(gcu_k.data(), cu_k.data(), cu_k.size() * 4, cudaMemcpyHostToDevice));
  if (c.alibi) CUDA_OK(cudaMemcpy(gslopes.data(), slopes.data(), slopes.size() * 4, cudaMemcpyHostToDevice));
  DeviceBuffer gused(4, int64_t(c.used_k.size()));
  ASSERT_TRUE(gused.ok());
  if (!c.used_k.empty())
    CUDA_OK(cudaMemcpy(gused.data(), c.used_k.data(), c.used_k.size() * 4, cudaMemcpyHostToDevice));

  // Poison: outputs NaN everywhere (gaps and guards included).
  const auto out_before = go.pattern_bytes(kNan16), lse_before = gl.pattern_bytes(kNan32);
  ASSERT_TRUE(go.upload(out_before));
  ASSERT_TRUE(gl.upload(lse_before));

  Options opt = c.options();
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
  for_each_placed(po, [&](int64_t n, int64_t off) {
    const int64_t row = n / (int64_t(c.heads) * dv);  // packed row (varlen) or b * sq + i
    if (!owned_q(row)) return;
    uint16_t bits;
    std::memcpy(&bits, &out_after[go.element_byte(off)], 2);
    for (size_t k = 0; k < 2; ++k) touched_o[go.element_byte(off) + k] = 1;
    ours_out.push_back(from_bits(c.dtype, bits));
  });
  for_each_placed(pl, [&](int64_t n, int64_t off) {
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

namespace {

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

::testing::TestEventListener* new_summary_printer() { return new SummaryPrinter; }

}  // namespace fa_test::fwd
