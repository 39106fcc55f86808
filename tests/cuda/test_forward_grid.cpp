// The forward against the fp64 oracle over a grid of cases (CudaForward.MatchesOracle, the Grid
// instantiation; the check itself is forward_run.h): every seqlen and head dim the kernels treat
// differently, masks, score modifiers, GQA, strided layouts, varlen, the sm90 kernel's multi-block
// and persistent-grid paths. Also the forward's optional LSE (CudaForward.OmittedLse...): leaving it
// out must not change the output on any kernel family. Without a usable sm80+ GPU every test is
// skipped (CI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"
#include "forward_run.h"

namespace fa_test::fwd {
namespace {

using flashattn::KernelChoice;

TEST_P(CudaForward, MatchesOracle) {
  SKIP_WITHOUT_GPU();
  ForwardRun(GetParam()).run();
}

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
      c.layout = k % 4 == 3 ? GpuLayout::bhsd : GpuLayout::dense;
      std::ostringstream n;
      n << "d" << c.d << "_sq" << c.sq << "_sk" << c.sk << "_b" << c.batch << "_h" << c.heads << "_" << c.heads_k
        << (c.dtype == DType::bf16 ? "_bf16" : "_fp16") << (c.causal ? "_causal" : "")
        << (c.wl >= 0 || c.wr >= 0 ? "_win" : "") << (c.softcap > 0 ? "_softcap" : "") << (c.alibi ? "_alibi" : "")
        << (c.layout == GpuLayout::bhsd ? "_bhsd" : "");
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
    c.layout = GpuLayout::bhsd;
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

INSTANTIATE_TEST_SUITE_P(Grid, CudaForward, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

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

}  // namespace
}  // namespace fa_test::fwd
