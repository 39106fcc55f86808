// forward_varlen / backward_varlen: packed sequences of different lengths, zero-length ones
// included (q and k both empty, only q empty, only k empty), rows past the last sequence
// (untouched), against the fp64 oracle and against the same sequences run one at a time through
// the fixed-length API.
#include "common/testing.h"

namespace fa_test {
namespace {

Config vcfg(std::vector<int> lq, std::vector<int> lk, int heads, int heads_k, int d, int dv = 0) {
  Config c;
  c.heads = heads;
  c.heads_k = heads_k;
  c.d = d;
  c.dv = dv;
  c.lens_q = std::move(lq);
  c.lens_k = std::move(lk);
  c.extra_rows = 3;
  return c;
}

std::string vname(const Config& c) {
  std::string n = c.name();
  n = n.substr(0, n.find("_b")) + "_n" + std::to_string(c.lens_q.size()) + n.substr(n.find("_h"));
  for (size_t b = 0; b < c.lens_q.size(); ++b)
    n += (b ? "_" : "_L") + std::to_string(c.lens_q[b]) + "x" + std::to_string(c.lens_k[b]);
  return n;
}

std::vector<Config> cases() {
  // sequence 0: both empty; 3: no queries; 4: no keys (all its rows masked); the rest awkward
  const std::vector<int> lq = {0, 7, 65, 0, 1, 130, 64}, lk = {0, 129, 64, 5, 0, 130, 63};
  const std::vector<int> eq = {0, 63, 1, 0, 129, 7};  // equal q/k lengths, for packed qkv
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    cs.push_back(c);
  };
  add(vcfg(lq, lk, 4, 2, 64), [](Config&) {});
  add(vcfg(lq, lk, 4, 2, 64), [](Config& c) { c.causal = true; });
  add(vcfg(lq, lk, 8, 1, 128), [](Config& c) { c.wl = 5, c.wr = 2; });
  add(vcfg(lq, lk, 4, 4, 96, 64), [](Config& c) { c.alibi = Alibi::batch_heads, c.causal = true; });
  add(vcfg(lq, lk, 4, 2, 40), [](Config& c) { c.softcap = 1.5f, c.alibi = Alibi::heads, c.wl = 3, c.wr = -1; });
  add(vcfg(eq, eq, 4, 2, 64), [](Config& c) { c.layout = Layout::packed; });
  add(vcfg(eq, eq, 8, 2, 32), [](Config& c) { c.layout = Layout::packed, c.causal = true, c.scale = 0.5f; });
  add(vcfg(lq, lk, 4, 2, 80), [](Config& c) { c.layout = Layout::padded, c.wl = -1, c.wr = 0; });
  add(vcfg({1013, 0, 3}, {17, 5, 1013}, 2, 1, 32), [](Config& c) { c.causal = true; });  // one long sequence
  std::vector<Config> r;
  for (DType t : {DType::f32, DType::f16, DType::bf16})
    for (Config c : cs) {
      c.dtype = t;
      r.push_back(c);
    }
  return r;
}

class Varlen : public ::testing::TestWithParam<Config> {};

TEST_P(Varlen, ForwardMatchesOracleAndPerSequenceRuns) {
  const Config& c = GetParam();
  VarlenProblem p(c, test_seed());
  ASSERT_TRUE(p.forward());  // also checks rows past the last sequence stay untouched
  const auto ours = p.ours();
  const auto ref = p.oracle(false);
  VarlenProblem::Dense base, fixed;
  ASSERT_TRUE(p.per_sequence(base, true, false));
  EXPECT_TRUE(close("O", c.dtype, ours.out, &base.out, ref.out));
  EXPECT_TRUE(close("LSE", c.dtype, ours.lse, &base.lse, ref.lse));
  int64_t masked = 0;
  EXPECT_TRUE(masked_rows_exact(ours.out, ours.lse, ref.lse, p.used_q(), c.heads, c.head_dim_v(),
                                [&](int64_t r, int h) { return h * p.used_q() + r; }, &masked));
  int64_t keyless_rows = 0;  // rows of sequences without keys: certainly masked
  for (size_t b = 0; b < c.lens_q.size(); ++b)
    if (c.lens_k[b] == 0) keyless_rows += int64_t(c.lens_q[b]) * c.heads;
  EXPECT_GE(masked, keyless_rows);
  // The same sequences through the fixed-length API agree as tightly as each agrees with ref.
  ASSERT_TRUE(p.per_sequence(fixed, false, false));
  EXPECT_TRUE(agree("O varlen vs per-sequence", c.dtype, ours.out, fixed.out, &base.out, ref.out));
  EXPECT_TRUE(agree("LSE varlen vs per-sequence", c.dtype, ours.lse, fixed.lse, &base.lse, ref.lse));
  if (ours.out != fixed.out) RecordProperty("per_sequence_bitwise", "no");
}

TEST_P(Varlen, BackwardMatchesOracleAndPerSequenceRuns) {
  const Config& c = GetParam();
  VarlenProblem p(c, test_seed());
  ASSERT_TRUE(p.forward());
  ASSERT_TRUE(p.backward());  // also checks rows past the last sequence stay untouched
  const auto ours = p.ours();
  const auto ref = p.oracle(true);
  VarlenProblem::Dense base, fixed;
  ASSERT_TRUE(p.per_sequence(base, true, true));
  EXPECT_TRUE(close("dQ", c.dtype, ours.dq, &base.dq, ref.dq));
  EXPECT_TRUE(close("dK", c.dtype, ours.dk, &base.dk, ref.dk));
  EXPECT_TRUE(close("dV", c.dtype, ours.dv, &base.dv, ref.dv));
  ASSERT_TRUE(p.per_sequence(fixed, false, true));
  EXPECT_TRUE(agree("dQ varlen vs per-sequence", c.dtype, ours.dq, fixed.dq, &base.dq, ref.dq));
  EXPECT_TRUE(agree("dK varlen vs per-sequence", c.dtype, ours.dk, fixed.dk, &base.dk, ref.dk));
  EXPECT_TRUE(agree("dV varlen vs per-sequence", c.dtype, ours.dv, fixed.dv, &base.dv, ref.dv));
}

INSTANTIATE_TEST_SUITE_P(Cases, Varlen, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return vname(info.param); });

// A batch whose every sequence is empty (cu_seqlens all zero, max_seqlen 0) while the packed
// tensors still have rows is valid and writes nothing.
TEST(VarlenEdge, AllSequencesEmptyForward) {
  Config c = vcfg({0, 0, 0}, {0, 0, 0}, 2, 1, 64);
  VarlenProblem p(c, test_seed());
  EXPECT_TRUE(p.forward());
}

TEST(VarlenEdge, AllSequencesEmptyBackward) {
  Config c = vcfg({0, 0, 0}, {0, 0, 0}, 2, 1, 64);
  VarlenProblem p(c, test_seed());  // out/lse stay poisoned: backward has no row to read them for
  EXPECT_TRUE(p.backward());
}

// Gradients of keys that belong to a sequence with no queries are exactly zero.
TEST(VarlenEdge, KeysOfQuerylessSequencesGetZeroGradient) {
  for (DType t : {DType::f32, DType::bf16}) {
    Config c = vcfg({5, 0, 9}, {6, 11, 9}, 4, 2, 64);
    c.dtype = t;
    VarlenProblem p(c, test_seed(short_name(t)));
    ASSERT_TRUE(p.forward());
    ASSERT_TRUE(p.backward());
    const auto ours = p.ours();
    for (int64_t j = p.cu_k[1]; j < p.cu_k[2]; ++j)
      for (int x = 0; x < c.heads_k * c.d; ++x)
        ASSERT_EQ(ours.dk[size_t(j * c.heads_k * c.d + x)], 0.0) << "key row " << j;
    for (int64_t j = p.cu_k[1]; j < p.cu_k[2]; ++j)
      for (int x = 0; x < c.heads_k * c.head_dim_v(); ++x)
        ASSERT_EQ(ours.dv[size_t(j * c.heads_k * c.head_dim_v() + x)], 0.0) << "key row " << j;
  }
}

}  // namespace
}  // namespace fa_test
