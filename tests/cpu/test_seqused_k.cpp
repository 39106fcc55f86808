// Options.seqused_k (flash_attn_with_kvcache's cache_seqlens): sequence b attends only the first
// seqused_k[b] keys of a fixed-size KV cache. The oracle with seqused_k must equal the oracle on
// views cut to those keys (the definition), and ours must match the oracle: decode and longer
// queries, causal / window / ALiBi aligned on the used length, every split count, varlen, empty
// caches. Bad values are rejected naming the argument, and the backward refuses it.
#include <cmath>
#include <cstring>

#include "common/testing.h"

namespace fa_test {
namespace {

// A sub-view of a (b, s, h, d) tensor: sequence b, its first `rows` rows.
Tensor sequence_view(const Tensor& t, int64_t b, int64_t rows) {
  Tensor s = t;
  s.data = static_cast<char*>(t.data) + b * t.stride[0] * int64_t(flashattn::dtype_size(t.dtype));
  s.shape[0] = 1;
  s.shape[1] = rows;
  return s;
}

struct Case {
  Config c;
  std::vector<int32_t> used;
};

std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](Config c, std::vector<int32_t> used, auto&& tweak) {
    tweak(c);
    c.batch = int(used.size());
    v.push_back({c, used});
  };
  Config dec;  // decode over a 300-key cache: 8 query heads over 2 kv heads
  dec.sq = 1;
  dec.sk = 300;
  dec.heads = 8;
  dec.heads_k = 2;
  dec.d = 64;
  add(dec, {300, 137, 0, 1}, [](Config&) {});
  add(dec, {300, 137, 0, 1}, [](Config& c) { c.num_splits = 3; });
  add(dec, {256, 5, 299}, [](Config& c) { c.num_splits = 1000; });
  add(dec, {200, 64}, [](Config& c) { c.wl = 50, c.wr = 0, c.alibi = Alibi::heads; });  // window ends at the used length
  add(dec, {300, 31}, [](Config& c) { c.layout = Layout::bhsd; });
  Config chunk = dec;  // a few new tokens per sequence: causal rows align on the used length
  chunk.sq = 5;
  chunk.sk = 96;
  add(chunk, {96, 40, 3, 0}, [](Config& c) { c.causal = true; });  // 3 < sq: the first rows see nothing
  add(chunk, {96, 40, 3, 0}, [](Config& c) { c.causal = true, c.softcap = 5.0f, c.num_splits = 2; });
  Config longer = dec;  // longer queries (the tiled path rather than decode)
  longer.sq = 70;
  longer.sk = 130;
  longer.heads = 4;
  add(longer, {130, 77}, [](Config& c) { c.causal = true; });
  add(longer, {1, 129}, [](Config&) {});
  return v;
}

class SequsedK : public ::testing::TestWithParam<Case> {};

TEST_P(SequsedK, MatchesOracleOnTheUsedKeys) {
  const Case& cs = GetParam();
  const Config& c = cs.c;
  Problem p(c, test_seed());
  std::vector<int32_t> used = cs.used;
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {int64_t(used.size())});

  // The definition: the oracle with seqused_k is the oracle run on each sequence cut to its keys.
  const auto ref = p.oracle_forward();
  Options cut_opt = p.opt;
  cut_opt.seqused_k.reset();
  for (int b = 0; b < c.batch; ++b) {  // (per-head ALiBi slopes only: the same for every cut)
    SCOPED_TRACE("sequence " + std::to_string(b));
    const auto one = ref::forward(sequence_view(p.q, b, c.sq), sequence_view(p.k, b, used[b]),
                                  sequence_view(p.v, b, used[b]), cut_opt);
    const int dv = c.head_dim_v();
    for (int64_t i = 0; i < c.sq; ++i)
      for (int h = 0; h < c.heads; ++h) {
        ASSERT_EQ(ref.lse[(int64_t(b) * c.heads + h) * c.sq + i], one.lse[int64_t(h) * c.sq + i]);
        for (int d = 0; d < dv; ++d)
          ASSERT_EQ(ref.out[((int64_t(b) * c.sq + i) * c.heads + h) * dv + d], one.out[(i * c.heads + h) * dv + d]);
      }
  }

  ASSERT_TRUE(p.forward());
  const auto out = to_dense(p.out), lse = to_dense(p.lse);
  EXPECT_TRUE(close("O", c.dtype, out, nullptr, ref.out));
  EXPECT_TRUE(close("LSE", c.dtype, lse, nullptr, ref.lse));
  EXPECT_TRUE(masked_rows_exact(out, lse, ref.lse, p.rows_q(), c.heads, c.head_dim_v(),
                                [&](int64_t r, int h) { return p.lse_index(r, h); }));
}

INSTANTIATE_TEST_SUITE_P(Cases, SequsedK, ::testing::ValuesIn(cases()), [](const auto& info) {
  std::string n = info.param.c.name() + "_used";
  for (int32_t u : info.param.used) {
    n += '_';
    n += std::to_string(u);
  }
  return n;
});

// Varlen: each sequence uses a prefix of its own packed keys.
TEST(SequsedKVarlen, MatchesOracle) {
  for (int splits : {0, 1, 4}) {
    SCOPED_TRACE("num_splits " + std::to_string(splits));
    Config c;
    c.heads = 8;
    c.heads_k = 4;
    c.d = 64;
    c.lens_q = {1, 3, 1, 2};
    c.lens_k = {200, 50, 0, 70};
    c.causal = true;
    c.num_splits = splits;
    VarlenProblem p(c, test_seed(std::to_string(splits)));
    std::vector<int32_t> used = {150, 50, 0, 1};
    p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {4});
    ASSERT_TRUE(p.forward());
    const auto ours = p.ours(), ref = p.oracle(false);
    EXPECT_TRUE(close("O", c.dtype, ours.out, nullptr, ref.out));
    EXPECT_TRUE(close("LSE", c.dtype, ours.lse, nullptr, ref.lse));
  }
}

// ---- validation -----------------------------------------------------------------------------
class SequsedKErrors : public ::testing::Test {
 protected:
  SequsedKErrors() : p(base_config(), 1) {}
  static Config base_config() {
    Config c;
    c.batch = 2;
    c.sq = 1;
    c.sk = 16;
    c.heads = 2;
    c.heads_k = 1;
    c.d = 32;
    return c;
  }
  void expect_error(const std::string& what_part) {
    try {
      flashattn::forward(p.q, p.k, p.v, p.out, p.lse, p.opt);
      FAIL() << "expected flashattn::Error";
    } catch (const flashattn::Error& e) {
      EXPECT_EQ(e.argument(), "seqused_k") << e.what();
      EXPECT_NE(std::string(e.what()).find(what_part), std::string::npos) << e.what();
    }
  }
  Problem p;
};

TEST_F(SequsedKErrors, WrongDtype) {
  std::vector<float> used = {1, 2};
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::f32, {2});
  expect_error("int32");
}

TEST_F(SequsedKErrors, WrongLength) {
  std::vector<int32_t> used = {1, 2, 3};
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {3});
  expect_error("length batch = 2");
}

TEST_F(SequsedKErrors, ValueAboveSeqlenK) {
  std::vector<int32_t> used = {16, 17};
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {2});
  expect_error("17 at index 1");
}

TEST_F(SequsedKErrors, NegativeValue) {
  std::vector<int32_t> used = {-1, 3};
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {2});
  expect_error("-1 at index 0");
}

TEST_F(SequsedKErrors, BackwardRefusesIt) {
  std::vector<int32_t> used = {3, 4};
  p.opt.seqused_k = Tensor::contiguous(used.data(), DType::i32, {2});
  try {
    flashattn::backward(p.out, p.q, p.k, p.v, p.out, p.lse, p.q, p.k, p.v, p.opt);
    FAIL() << "expected flashattn::Error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "seqused_k") << e.what();
  }
}

// seqused_q (flash_attn v3): sequence b uses its first seqused_q[b] query rows; rows past them are
// not written (their poison stays), the used rows match the oracle (aligned on the used length).
TEST(SequsedQVarlen, UsesTheFirstRowsAndWritesNoOther) {
  Config c;
  c.heads = 4;
  c.heads_k = 2;
  c.d = 32;
  c.lens_q = {5, 3, 70, 2};
  c.lens_k = {9, 2, 80, 0};
  c.causal = true;
  VarlenProblem p(c, test_seed());
  std::vector<int32_t> used = {2, 3, 33, 0};
  p.opt.seqused_q = Tensor::contiguous(used.data(), DType::i32, {4});
  ASSERT_TRUE(p.forward());  // poisons out/lse first
  const auto ours = p.ours(), ref = p.oracle(false);
  const int dv = c.head_dim_v();
  for (int b = 0; b < 4; ++b)
    for (int64_t i = 0; i < c.lens_q[b]; ++i)
      for (int h = 0; h < c.heads; ++h) {
        const int64_t row = p.cu_q[b] + i;
        const double o = ours.out[(row * c.heads + h) * dv];
        if (i >= used[b]) {
          EXPECT_TRUE(std::isnan(o)) << "row " << i << " of sequence " << b << " was written";
          EXPECT_TRUE(std::isnan(ours.lse[h * p.used_q() + row]));
        }
      }
  // The used rows against the oracle (the unused ones are the oracle's zeros / -inf vs our poison).
  std::vector<double> ours_out = ours.out, ours_lse = ours.lse;
  for (size_t i = 0; i < ours_out.size(); ++i)
    if (std::isnan(ours_out[i])) ours_out[i] = ref.out[i];
  for (size_t i = 0; i < ours_lse.size(); ++i)
    if (std::isnan(ours_lse[i])) ours_lse[i] = ref.lse[i];
  EXPECT_TRUE(close("O", c.dtype, ours_out, nullptr, ref.out));
  EXPECT_TRUE(close("LSE", c.dtype, ours_lse, nullptr, ref.lse));
  used[2] = 71;  // past the sequence's 70 rows
  EXPECT_FALSE(runs("bad seqused_q", [&] { flashattn::forward_varlen(p.q, p.k, p.v, p.out, p.lse, p.layout, p.opt); }));
}

}  // namespace
}  // namespace fa_test
