// The decode path (flash-decoding): few queries over many keys, with Options.num_splits 0
// (heuristic), 1 (never split), 3, 8 and more splits than key blocks. Every result matches the
// oracle, and all of them agree with each other. Windows that leave whole splits without a
// visible key exercise the "LSE -inf contributes nothing" rule on the real path.
#include "common/testing.h"

namespace fa_test {
namespace {

const int kSplits[] = {0, 1, 3, 8, 1000};

std::vector<Config> cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    for (DType t : {DType::f32, DType::f16, DType::bf16}) {
      c.dtype = t;
      cs.push_back(c);
    }
  };
  add(cfg(2, 1, 4096, 8, 2, 128), [](Config&) {});
  add(cfg(2, 4, 4099, 8, 2, 128), [](Config& c) { c.causal = true; });
  add(cfg(1, 1, 5000, 8, 1, 64), [](Config& c) { c.wl = 300, c.wr = 0; });  // early splits see nothing
  add(cfg(2, 4, 4097, 4, 4, 256), [](Config& c) { c.wl = 1000, c.wr = -1, c.alibi = Alibi::batch_heads; });
  add(cfg(1, 4, 4099, 8, 2, 96), [](Config& c) { c.softcap = 3.0f, c.alibi = Alibi::heads, c.causal = true; });
  add(cfg(1, 1, 4100, 16, 2, 80), [](Config& c) { c.layout = Layout::bhsd; });  // a (b, h, s, d) KV cache
  add(cfg(1, 4, 4096, 8, 8, 40), [](Config& c) { c.layout = Layout::padded, c.scale = 0.2f; });
  add(cfg(3, 1, 65, 4, 1, 64), [](Config&) {});  // fewer key blocks than splits asked for
  return cs;
}

class Decode : public ::testing::TestWithParam<Config> {};

TEST_P(Decode, EverySplitCountMatchesOracleAndEachOther) {
  const Config c = GetParam();
  Problem p(c, test_seed());  // the same inputs for every split count
  const auto ref = p.oracle_forward();
  Problem::Baseline base;
  ASSERT_TRUE(p.baseline(base, false));
  std::vector<std::vector<double>> outs, lses;
  for (int splits : kSplits) {
    SCOPED_TRACE("num_splits " + std::to_string(splits));
    p.opt.num_splits = splits;
    ASSERT_TRUE(p.forward());
    outs.push_back(to_dense(p.out));
    lses.push_back(to_dense(p.lse));
    EXPECT_TRUE(close("O", c.dtype, outs.back(), &base.out, ref.out));
    EXPECT_TRUE(close("LSE", c.dtype, lses.back(), &base.lse, ref.lse));
    EXPECT_TRUE(masked_rows_exact(outs.back(), lses.back(), ref.lse, p.rows_q(), c.heads, c.head_dim_v(),
                                  [&](int64_t r, int h) { return p.lse_index(r, h); }));
    EXPECT_TRUE(agree("O vs num_splits 0", c.dtype, outs.back(), outs.front(), &base.out, ref.out));
    EXPECT_TRUE(agree("LSE vs num_splits 0", c.dtype, lses.back(), lses.front(), &base.lse, ref.lse));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, Decode, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name(); });

// Decode through the varlen API (one or a few new tokens per sequence over caches of different
// lengths, one of them empty) with every split count.
TEST(DecodeVarlen, EverySplitCountMatchesOracle) {
  for (DType t : {DType::f32, DType::bf16}) {
    Config c;
    c.dtype = t;
    c.heads = 8;
    c.heads_k = 2;
    c.d = 128;
    c.lens_q = {1, 1, 4, 1};
    c.lens_k = {4096, 17, 4099, 0};
    c.causal = true;
    VarlenProblem p(c, test_seed(short_name(t)));
    const auto ref = p.oracle(false);
    VarlenProblem::Dense base;
    ASSERT_TRUE(p.per_sequence(base, true, false));
    std::vector<std::vector<double>> outs;
    for (int splits : kSplits) {
      SCOPED_TRACE(std::string(short_name(t)) + " num_splits " + std::to_string(splits));
      p.opt.num_splits = splits;
      ASSERT_TRUE(p.forward());
      const auto ours = p.ours();
      EXPECT_TRUE(close("O", t, ours.out, &base.out, ref.out));
      EXPECT_TRUE(close("LSE", t, ours.lse, &base.lse, ref.lse));
      EXPECT_TRUE(masked_rows_exact(ours.out, ours.lse, ref.lse, p.used_q(), c.heads, c.head_dim_v(),
                                    [&](int64_t r, int h) { return h * p.used_q() + r; }));
      outs.push_back(ours.out);
      EXPECT_TRUE(agree("O vs num_splits 0", t, outs.back(), outs.front(), &base.out, ref.out));
    }
  }
}

}  // namespace
}  // namespace fa_test
