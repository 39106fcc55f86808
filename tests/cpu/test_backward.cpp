// flashattn::backward on the CPU: dQ, dK, dV against the fp64 oracle's backward (docs/DESIGN.md §5 rule,
// every dtype, shape grid, GQA, options, layouts), and directly against central differences of
// L = sum(O * G) on tiny fp32 problems.
#include "common/testing.h"

namespace fa_test {
namespace {

// Every seqlen and head dim of the grid, both sq < sk and sq > sk; the fp64 backward oracle costs
// ~5 sq sk d, so 1013 appears with one head.
std::vector<Config> shape_grid() {
  return for_all_dtypes({
      cfg(1, 1, 1, 2, 1, 32),
      cfg(2, 7, 7, 2, 2, 40),
      cfg(1, 63, 65, 2, 1, 64),
      cfg(1, 64, 64, 1, 1, 80),
      cfg(1, 65, 63, 2, 2, 96),
      cfg(1, 127, 129, 1, 1, 128),
      cfg(1, 128, 128, 1, 1, 192),
      cfg(1, 129, 127, 1, 1, 256),
      cfg(1, 1013, 1013, 1, 1, 32),
      cfg(1, 1, 1013, 2, 1, 64),
      cfg(1, 1013, 63, 1, 1, 80),
      cfg(1, 7, 129, 2, 2, 128),
      cfg(1, 129, 1, 1, 1, 96),
      cfg(1, 64, 127, 1, 1, 256),
      cfg(1, 128, 7, 2, 1, 192),
      cfg(1, 65, 1013, 1, 1, 40),
  });
}

std::vector<Config> gqa_grid() {
  std::vector<Config> cs;
  for (int hk : {8, 4, 1})
    for (bool causal : {false, true}) {
      Config c = cfg(1, 65, 129, 8, hk, 64);
      c.causal = causal;
      cs.push_back(c);
    }
  return for_all_dtypes(cs);
}

std::vector<Config> option_grid() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    cs.push_back(c);
  };
  const Config a = cfg(1, 127, 129, 4, 2, 64);  // sq < sk
  const Config b = cfg(2, 129, 65, 2, 1, 96);   // sq > sk
  add(a, [](Config& c) { c.causal = true; });
  add(b, [](Config& c) { c.causal = true; });  // fully masked rows: dQ = 0 there
  add(a, [](Config& c) { c.wl = -1, c.wr = 0; });
  add(a, [](Config& c) { c.wl = 3, c.wr = -1; });
  add(a, [](Config& c) { c.wl = 5, c.wr = 2; });
  add(b, [](Config& c) { c.wl = 5, c.wr = 2; });
  add(cfg(1, 129, 7, 2, 1, 64), [](Config& c) { c.wl = 0, c.wr = 0; });  // keys no row sees: dK = dV = 0
  add(a, [](Config& c) { c.softcap = 1.5f; });
  add(b, [](Config& c) { c.softcap = 30.0f, c.scale = 1.0f; });
  add(a, [](Config& c) { c.alibi = Alibi::heads; });
  add(b, [](Config& c) { c.alibi = Alibi::batch_heads, c.causal = true; });
  add(a, [](Config& c) { c.scale = 0.3f; });
  add(a, [](Config& c) { c.causal = true, c.wl = 20, c.softcap = 2.0f, c.alibi = Alibi::batch_heads, c.scale = 0.25f; });
  add(cfg(1, 65, 127, 4, 2, 64, 32), [](Config&) {});
  add(cfg(1, 129, 64, 2, 1, 192, 128), [](Config& c) { c.causal = true; });
  add(cfg(1, 63, 65, 2, 2, 32, 256), [](Config&) {});
  add(cfg(2, 129, 129, 4, 4, 64), [](Config& c) { c.layout = Layout::packed; });  // dqkv packed too
  add(cfg(1, 65, 65, 8, 2, 128), [](Config& c) { c.layout = Layout::packed, c.causal = true; });
  add(a, [](Config& c) { c.layout = Layout::padded; });
  add(b, [](Config& c) { c.layout = Layout::padded, c.wl = 9, c.wr = 4, c.alibi = Alibi::heads; });
  add(cfg(2, 63, 130, 4, 1, 40), [](Config& c) { c.layout = Layout::bhsd; });
  add(cfg(3, 33, 47, 3, 1, 64), [](Config& c) { c.causal = true; });
  add(cfg(2, 7, 0, 2, 1, 64), [](Config&) {});  // no keys: dQ = 0
  add(cfg(2, 0, 7, 2, 1, 64), [](Config&) {});  // no queries: dK = dV = 0
  return for_all_dtypes(cs);
}

void check_backward(const Config& c) {
  Problem p(c, test_seed());
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());
  const auto ref = p.oracle_backward();
  Problem::Baseline base;
  ASSERT_TRUE(p.baseline(base, true));
  const auto dq = to_dense(p.dq), dk = to_dense(p.dk), dv = to_dense(p.dv);
  EXPECT_TRUE(close("dQ", c.dtype, dq, &base.dq, ref.dq));
  EXPECT_TRUE(close("dK", c.dtype, dk, &base.dk, ref.dk));
  EXPECT_TRUE(close("dV", c.dtype, dv, &base.dv, ref.dv));
  // Rows that see no key have exactly zero dQ (not NaN, not garbage).
  const auto fref = p.oracle_forward();
  for (int64_t r = 0; r < p.rows_q(); ++r)
    for (int h = 0; h < c.heads; ++h) {
      if (fref.lse[size_t(p.lse_index(r, h))] != -kInf) continue;
      for (int x = 0; x < c.d; ++x)
        if (dq[size_t((r * c.heads + h) * c.d + x)] != 0.0) {
          ADD_FAILURE() << "fully masked row " << r << " head " << h << ": dQ[" << x << "] = "
                        << dq[size_t((r * c.heads + h) * c.d + x)];
          return;
        }
    }
}

class BackwardShapes : public ::testing::TestWithParam<Config> {};
TEST_P(BackwardShapes, MatchesOracle) { check_backward(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Grid, BackwardShapes, ::testing::ValuesIn(shape_grid()),
                         [](const auto& info) { return info.param.name(); });

class BackwardGqa : public ::testing::TestWithParam<Config> {};
TEST_P(BackwardGqa, MatchesOracle) { check_backward(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Ratios, BackwardGqa, ::testing::ValuesIn(gqa_grid()),
                         [](const auto& info) { return info.param.name(); });

class BackwardOptions : public ::testing::TestWithParam<Config> {};
TEST_P(BackwardOptions, MatchesOracle) { check_backward(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Options, BackwardOptions, ::testing::ValuesIn(option_grid()),
                         [](const auto& info) { return info.param.name(); });

// ---- ours against finite differences -----------------------------------------------------------

constexpr double kQuantum = 1.0 / 256, kStep = 1.0 / 16384;

std::vector<Config> fd_cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    c.quantum = kQuantum;
    cs.push_back(c);
  };
  add(cfg(1, 4, 5, 2, 1, 4, 3), [](Config&) {});
  add(cfg(2, 5, 3, 2, 2, 3), [](Config& c) { c.causal = true; });
  add(cfg(1, 5, 6, 2, 1, 4), [](Config& c) { c.wl = 1, c.wr = 2; });
  add(cfg(1, 4, 5, 2, 1, 4, 3), [](Config& c) { c.softcap = 1.0f, c.scale = 1.5f; });
  add(cfg(2, 4, 5, 2, 1, 4), [](Config& c) { c.alibi = Alibi::batch_heads, c.causal = true; });
  add(cfg(1, 9, 9, 4, 1, 6), [](Config& c) { c.layout = Layout::packed, c.wl = 2; });
  return cs;
}

class BackwardFiniteDifferences : public ::testing::TestWithParam<Config> {};

// fp32: ours vs central differences within the fp32 rule (FD error is ~1e-8 relative, see
// test_reference.cpp).
TEST_P(BackwardFiniteDifferences, Match) {
  Problem p(GetParam(), test_seed());
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());
  const auto g = to_dense(p.dout);
  auto fwd = [&] { return p.oracle_forward().out; };
  EXPECT_TRUE(close_rel("dQ", to_dense(p.dq), fd_gradient(p.q, g, fwd, kStep)));
  EXPECT_TRUE(close_rel("dK", to_dense(p.dk), fd_gradient(p.k, g, fwd, kStep)));
  EXPECT_TRUE(close_rel("dV", to_dense(p.dv), fd_gradient(p.v, g, fwd, kStep)));
}

INSTANTIATE_TEST_SUITE_P(Tiny, BackwardFiniteDifferences, ::testing::ValuesIn(fd_cases()),
                         [](const auto& info) { return info.param.name(); });

// The gradient buffers are outputs: whatever they held before (NaN from Problem::backward's
// poison, +inf here) must not leak into the result, i.e. the kernel initialises them itself.
TEST(Backward, IgnoresWhatTheGradientsHeldBefore) {
  Config c = cfg(1, 65, 129, 4, 2, 64);
  Problem p(c, test_seed());
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());
  const auto ref = p.oracle_backward();
  for (const Tensor* t : {&p.dq, &p.dk, &p.dv}) for_each_offset(*t, [&](int64_t off) { store(*t, off, kInf); });
  flashattn::backward(p.dout, p.q, p.k, p.v, p.out, p.lse, p.dq, p.dk, p.dv, p.opt);
  EXPECT_TRUE(close_rel("dQ", to_dense(p.dq), ref.dq));
  EXPECT_TRUE(close_rel("dK", to_dense(p.dk), ref.dk));
  EXPECT_TRUE(close_rel("dV", to_dense(p.dv), ref.dv));
}

}  // namespace
}  // namespace fa_test
