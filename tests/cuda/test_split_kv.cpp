// Split-KV (flash-decoding), the decode kernel and the merge that combines split results: the
// SplitKV cases of CudaForward.MatchesOracle (the oracle check of forward_run.h), the host-side
// split plan (CudaSplitKV.PlanSplits, needs no GPU), split against un-split runs, and the CUDA
// merge against the CPU merge (CudaMerge). Without a usable sm80+ GPU the GPU tests are skipped (CI).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "core/half.h"
#include "core/params.h"
#include "cuda/split_kv.h"
#include "flashattn/flashattn.h"
#include "forward_run.h"

namespace fa_test::fwd {
namespace {

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
    c.layout = GpuLayout::bhsd;
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
    c.layout = GpuLayout::bhsd;
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

}  // namespace
}  // namespace fa_test::fwd
