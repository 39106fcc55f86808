// deterministic=true: backward gives bitwise-identical dQ, dK, dV run to run (memcmp), for each
// thread count (Options.num_threads), and stays correct. The forward is deterministic anyway
// (no atomics): checked bitwise as well.
#include <cstring>

#include "common/testing.h"

namespace fa_test {
namespace {

// The bytes of every element of t, in logical order.
std::vector<uint8_t> bytes_of(const Tensor& t) {
  const size_t es = flashattn::dtype_size(t.dtype);
  std::vector<uint8_t> r;
  r.reserve(size_t(t.numel()) * es);
  for_each_offset(t, [&](int64_t off) {
    const auto* p = static_cast<const uint8_t*>(t.data) + off * int64_t(es);
    r.insert(r.end(), p, p + es);
  });
  return r;
}

bool same_bytes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

std::vector<Config> cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    for (DType t : {DType::f32, DType::f16, DType::bf16}) {
      c.dtype = t;
      cs.push_back(c);
    }
  };
  add(cfg(2, 200, 300, 8, 2, 64), [](Config&) {});
  add(cfg(1, 129, 1013, 4, 1, 128), [](Config& c) { c.causal = true; });  // many key chunks feed one dQ row
  add(cfg(1, 1013, 129, 2, 2, 32), [](Config& c) { c.wl = 40, c.wr = 3, c.alibi = Alibi::heads; });
  add(cfg(2, 65, 65, 8, 8, 96), [](Config& c) { c.layout = Layout::packed, c.softcap = 2.0f; });
  return cs;
}

class Determinism : public ::testing::TestWithParam<Config> {};

TEST_P(Determinism, BackwardIsBitwiseRepeatablePerThreadCount) {
  const Config c0 = GetParam();
  Problem p(c0, test_seed());
  ASSERT_TRUE(p.forward());
  std::vector<std::vector<uint8_t>> per_threads;  // dq|dk|dv bytes of the first run per count
  for (int threads : {1, 2, 3, 4}) {
    SCOPED_TRACE("num_threads " + std::to_string(threads));
    p.opt.num_threads = threads;
    std::vector<uint8_t> first[3];
    for (int run = 0; run < 3; ++run) {
      ASSERT_TRUE(p.backward());
      const std::vector<uint8_t> now[3] = {bytes_of(p.dq), bytes_of(p.dk), bytes_of(p.dv)};
      if (run == 0) {
        for (int i = 0; i < 3; ++i) first[i] = now[i];
        continue;
      }
      EXPECT_TRUE(same_bytes(now[0], first[0])) << "dQ differs between runs " << 0 << " and " << run;
      EXPECT_TRUE(same_bytes(now[1], first[1])) << "dK differs between runs " << 0 << " and " << run;
      EXPECT_TRUE(same_bytes(now[2], first[2])) << "dV differs between runs " << 0 << " and " << run;
    }
    std::vector<uint8_t> all = first[0];
    all.insert(all.end(), first[1].begin(), first[1].end());
    all.insert(all.end(), first[2].begin(), first[2].end());
    per_threads.push_back(std::move(all));
  }
  // Still the right answer.
  const auto ref = p.oracle_backward();
  Problem::Baseline base;
  ASSERT_TRUE(p.baseline(base, true));
  EXPECT_TRUE(close("dQ", c0.dtype, to_dense(p.dq), &base.dq, ref.dq));
  EXPECT_TRUE(close("dK", c0.dtype, to_dense(p.dk), &base.dk, ref.dk));
  EXPECT_TRUE(close("dV", c0.dtype, to_dense(p.dv), &base.dv, ref.dv));
  // Across thread counts bitwise equality is not promised (docs/DESIGN.md §5: "run to run"); recorded only.
  int same = 0;
  for (const auto& b : per_threads) same += same_bytes(b, per_threads.front());
  RecordProperty("thread_counts_bitwise_equal_to_1_thread", same);
}

TEST_P(Determinism, ForwardIsBitwiseRepeatable) {
  Config c = GetParam();
  Problem p(c, test_seed());
  const auto ref = p.oracle_forward();
  Problem::Baseline base;
  ASSERT_TRUE(p.baseline(base, false));
  for (int threads : {1, 2, 3}) {
    SCOPED_TRACE("num_threads " + std::to_string(threads));
    p.opt.num_threads = threads;
    ASSERT_TRUE(p.forward());
    const auto o = bytes_of(p.out), l = bytes_of(p.lse);
    EXPECT_TRUE(close("O", c.dtype, to_dense(p.out), &base.out, ref.out));  // any thread count is right
    ASSERT_TRUE(p.forward());
    EXPECT_TRUE(same_bytes(bytes_of(p.out), o));
    EXPECT_TRUE(same_bytes(bytes_of(p.lse), l));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, Determinism, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name(); });

TEST(DeterminismVarlen, BackwardIsBitwiseRepeatable) {
  Config c;
  c.dtype = DType::bf16;
  c.heads = 8;
  c.heads_k = 2;
  c.d = 64;
  c.lens_q = {0, 130, 7, 1013, 0};
  c.lens_k = {5, 130, 0, 300, 0};
  c.causal = true;
  c.deterministic = true;
  VarlenProblem p(c, test_seed());
  ASSERT_TRUE(p.forward());
  for (int threads : {2, 3}) {
    SCOPED_TRACE("num_threads " + std::to_string(threads));
    p.opt.num_threads = threads;
    ASSERT_TRUE(p.backward());
    const auto a = p.ours();
    ASSERT_TRUE(p.backward());
    const auto b = p.ours();
    EXPECT_TRUE(a.dq == b.dq && a.dk == b.dk && a.dv == b.dv) << "varlen gradients differ between runs";
  }
}

}  // namespace
}  // namespace fa_test
