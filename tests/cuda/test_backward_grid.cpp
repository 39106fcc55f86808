// The backward against the fp64 oracle over a grid of cases (Grid/CudaBackward.MatchesOracle; the
// check itself is backward_problem.h): every seqlen and head dim the kernels treat differently,
// masks, score modifiers, GQA/MQA, strided layouts, the deterministic mode, A100's tiles, the sm90
// backward's multi-block paths, empty problems and varlen batches with empty sequences. Without a
// usable sm80+ GPU every test is skipped (CI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "backward_problem.h"
#include "common/gpu_testing.h"

namespace fa_test::bwd {
namespace {

// The gtest name of a grid case: its parameters spelled out (device-script filters match on them).
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

}  // namespace
}  // namespace fa_test::bwd
