// Attention sinks (Options::sinks, core/sink.h) in the fixed-length and varlen entries: forward
// (tiled, decode and split-KV paths) against the fp64 oracle, the oracle's sink against its
// definition (softmax over the scores plus one value-less logit), the backward given the sinked
// LSE, and sink_gradient() against the oracle and against finite differences.
#include <cmath>

#include "common/testing.h"
#include "core/sink.h"

namespace fa_test {
namespace {

struct SinkCase {
  Config c;
  std::string tag;
};

std::vector<SinkCase> cases() {
  std::vector<SinkCase> v;
  Config tiled;
  tiled.batch = 2, tiled.sq = 70, tiled.sk = 90, tiled.heads = 4, tiled.heads_k = 2, tiled.d = 64;
  v.push_back({tiled, "tiled"});
  Config causal = tiled;
  causal.causal = true, causal.sq = 100, causal.sk = 40;  // some rows see no key: LSE = sink
  v.push_back({causal, "causal_empty_rows"});
  Config decode = tiled;
  decode.sq = 1, decode.sk = 700, decode.heads = 8;
  v.push_back({decode, "decode"});
  Config split = decode;
  split.num_splits = 4;
  v.push_back({split, "decode_split"});
  Config tiled_split = tiled;
  tiled_split.sq = 30, tiled_split.sk = 900, tiled_split.heads = 16, tiled_split.heads_k = 1, tiled_split.num_splits = 3;
  v.push_back({tiled_split, "tiled_split"});
  Config mods = tiled;
  mods.softcap = 4, mods.alibi = Alibi::heads, mods.wl = 20, mods.wr = 3;
  v.push_back({mods, "softcap_alibi_window"});
  Config bf16 = tiled;
  bf16.dtype = DType::bf16;
  v.push_back({bf16, "bf16"});
  return v;
}

class Sinks : public ::testing::TestWithParam<SinkCase> {};

Tensor make_sinks(Buffer& buf, int heads, Rng& rng) {
  buf = Buffer(DType::f32, heads);
  Tensor t = view(buf, {heads});
  fill_normal(t, rng, 2.0);
  return t;
}

TEST_P(Sinks, ForwardMatchesOracle) {
  const Config& c = GetParam().c;
  Problem p(c, test_seed());
  Rng rng(test_seed("sinks"));
  Buffer sink_buf;
  p.opt.sinks = make_sinks(sink_buf, c.heads, rng);
  const auto ref = p.oracle_forward();

  // The oracle's sink is the definition: LSE' = logaddexp(LSE, sink), O' = O * exp(LSE - LSE').
  Options plain = p.opt;
  plain.sinks.reset();
  const auto no_sink = ref::forward(p.q, p.k, p.v, plain);
  const auto* sinks = static_cast<const float*>(sink_buf.data());
  for (int64_t r = 0; r < p.rows_q(); ++r)
    for (int h = 0; h < c.heads; ++h) {
      const double l = no_sink.lse[p.lse_index(r, h)], s = sinks[h];
      const double want = l == -kInf ? s : std::max(l, s) + std::log1p(std::exp(-std::abs(l - s)));
      ASSERT_NEAR(ref.lse[p.lse_index(r, h)], want, 1e-12);
      const double scale = l == -kInf ? 0.0 : std::exp(l - want);
      for (int d = 0; d < c.head_dim_v(); ++d) {
        const int64_t i = (r * c.heads + h) * c.head_dim_v() + d;
        ASSERT_NEAR(ref.out[i], no_sink.out[i] * scale, 1e-12);
      }
    }

  ASSERT_TRUE(p.forward());
  const auto out = to_dense(p.out), lse = to_dense(p.lse);
  if (c.dtype == DType::f32) {
    EXPECT_TRUE(close_rel("O", out, ref.out));
    EXPECT_TRUE(close_rel("LSE", lse, ref.lse));
  } else {
    Problem::Baseline base;
    ASSERT_TRUE(p.baseline(base, false));  // the standard attention has no sink: apply it to its (O, LSE)
    for (int64_t r = 0; r < p.rows_q(); ++r)
      for (int h = 0; h < c.heads; ++h) {
        double& l = base.lse[p.lse_index(r, h)];
        const double lse_s = flashattn::add_sink_lse(l, sinks[h]);
        for (int d = 0; d < c.head_dim_v(); ++d) base.out[(r * c.heads + h) * c.head_dim_v() + d] *= l == -kInf ? 0 : std::exp(l - lse_s);
        l = lse_s;
      }
    EXPECT_TRUE(close("O", c.dtype, out, &base.out, ref.out));
    EXPECT_TRUE(close("LSE", c.dtype, lse, &base.lse, ref.lse));
  }
}

TEST_P(Sinks, BackwardAndSinkGradientMatchOracle) {
  Config c = GetParam().c;
  if (c.dtype != DType::f32 || c.sq == 1) GTEST_SKIP() << "gradients: the fp32 cases with several rows";
  c.num_splits = 0;
  Problem p(c, test_seed());
  Rng rng(test_seed("sinks"));
  Buffer sink_buf, dsink_buf(DType::f32, c.heads);
  p.opt.sinks = make_sinks(sink_buf, c.heads, rng);
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());
  const auto ref = p.oracle_backward();
  EXPECT_TRUE(close_rel("dQ", to_dense(p.dq), ref.dq));
  EXPECT_TRUE(close_rel("dK", to_dense(p.dk), ref.dk));
  EXPECT_TRUE(close_rel("dV", to_dense(p.dv), ref.dv));
  const Tensor dsinks = view(dsink_buf, {c.heads});
  dsink_buf.poison();
  ASSERT_TRUE(runs("sink_gradient", [&] { flashattn::sink_gradient(p.dout, p.out, p.lse, *p.opt.sinks, dsinks); }));
  EXPECT_TRUE(close_rel("dsinks", to_dense(dsinks), ref.dsinks));
}

INSTANTIATE_TEST_SUITE_P(Cases, Sinks, ::testing::ValuesIn(cases()), [](const auto& info) { return info.param.tag; });

// The oracle's d(sink) against central differences of its own forward: L = sum(O * G).
TEST(SinksOracle, GradientMatchesFiniteDifferences) {
  Config c;
  c.batch = 2, c.sq = 5, c.sk = 6, c.heads = 3, c.heads_k = 1, c.d = 8, c.causal = true;
  c.sq = 9;  // rows 0-2 see no key
  Problem p(c, test_seed());
  Rng rng(test_seed("sinks"));
  Buffer sink_buf;
  p.opt.sinks = make_sinks(sink_buf, c.heads, rng);
  const auto g = to_dense(p.dout);
  const auto fd = fd_gradient(*p.opt.sinks, g, [&] { return ref::forward(p.q, p.k, p.v, p.opt).out; }, 1e-4);
  const auto ref = ref::backward(p.dout, p.q, p.k, p.v, p.opt);
  ASSERT_EQ(ref.dsinks.size(), fd.size());
  for (size_t h = 0; h < fd.size(); ++h) EXPECT_NEAR(ref.dsinks[h], fd[h], 1e-6 + 1e-5 * std::abs(fd[h])) << "head " << h;
}

TEST(SinksVarlen, ForwardAndGradientMatchOracle) {
  Config c;
  c.heads = 4, c.heads_k = 2, c.d = 32, c.causal = true;
  c.lens_q = {3, 0, 40, 1};
  c.lens_k = {50, 7, 40, 0};
  VarlenProblem p(c, test_seed());
  Rng rng(test_seed("sinks"));
  Buffer sink_buf, dsink_buf(DType::f32, c.heads);
  p.opt.sinks = make_sinks(sink_buf, c.heads, rng);
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());
  const auto ours = p.ours(), ref = p.oracle(true);
  EXPECT_TRUE(close_rel("O", ours.out, ref.out));
  EXPECT_TRUE(close_rel("LSE", ours.lse, ref.lse));
  EXPECT_TRUE(close_rel("dQ", ours.dq, ref.dq));
  EXPECT_TRUE(close_rel("dK", ours.dk, ref.dk));
  const Tensor dsinks = view(dsink_buf, {c.heads});
  ASSERT_TRUE(runs("sink_gradient", [&] { flashattn::sink_gradient(p.dout, p.out, p.lse, *p.opt.sinks, dsinks, &p.layout); }));
  const auto full = ref::backward(p.dout, p.q, p.k, p.v, p.opt, &p.layout);
  EXPECT_TRUE(close_rel("dsinks", to_dense(dsinks), full.dsinks));
}

TEST(SinksValidation, RejectsBadSinksAndDsinks) {
  Config c;
  c.heads = 4;
  Problem p(c, test_seed());
  Buffer sink_buf(DType::f32, 3), dsink_buf(DType::f32, 4), ok_buf(DType::f32, 4);
  p.opt.sinks = view(sink_buf, {3});
  try {
    flashattn::forward(p.q, p.k, p.v, p.out, p.lse, p.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "sinks");
  }
  Tensor bad_dsinks = view(dsink_buf, {4});
  bad_dsinks.dtype = DType::bf16;
  try {
    flashattn::sink_gradient(p.out, p.out, p.lse, view(ok_buf, {4}), bad_dsinks);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_TRUE(e.argument() == "dsinks" || e.argument() == "dout") << e.what();
  }
}

}  // namespace
}  // namespace fa_test
