// flashattn::merge: attention over disjoint key chunks, merged, equals attention over all keys.
//   - chunks computed by the oracle (tests merge alone) and by our forward on k/v slices;
//   - a split (or some rows of one) that saw no key (LSE -inf) contributes nothing, even with
//     NaN in its partial output; rows no split saw give O = 0, LSE = -inf;
//   - the closed-form fp64 merge on synthetic partials, strided tensors, every output dtype.
#include <cmath>

#include "common/testing.h"

namespace fa_test {
namespace {

// Keys [lo, hi) of a (b, s, h, d) view.
Tensor key_slice(Tensor t, int64_t lo, int64_t hi) {
  t.data = static_cast<uint8_t*>(t.data) + lo * t.stride[1] * int64_t(flashattn::dtype_size(t.dtype));
  t.shape[1] = hi - lo;
  return t;
}

// Partials stacked as merge wants them: out (splits, b, sq, h, dv) fp32, lse (splits, b, h, sq).
struct Partials {
  Buffer out_buf, lse_buf;
  Tensor out, lse;
  Partials(int splits, const Config& c) {
    const int dv = c.head_dim_v();
    out_buf = Buffer(DType::f32, int64_t(splits) * c.batch * c.sq * c.heads * dv);
    lse_buf = Buffer(DType::f32, int64_t(splits) * c.batch * c.heads * c.sq);
    out = view(out_buf, {splits, c.batch, c.sq, c.heads, dv});
    lse = view(lse_buf, {splits, c.batch, c.heads, c.sq});
  }
  // Copies dense (b*sq, h, dv) / (b, h, sq) results into split s (NaN stays NaN).
  void set(int s, const std::vector<double>& o, const std::vector<double>& l) {
    const int64_t no = out.numel() / out.shape[0], nl = lse.numel() / lse.shape[0];
    for (int64_t i = 0; i < no; ++i) static_cast<float*>(out.data)[s * no + i] = float(o[size_t(i)]);
    for (int64_t i = 0; i < nl; ++i) static_cast<float*>(lse.data)[s * nl + i] = float(l[size_t(i)]);
  }
};

struct Merged {
  Buffer out_buf, lse_buf;
  Tensor out, lse;
  ::testing::AssertionResult run(const Tensor& po, const Tensor& pl, const Config& c, DType out_dtype,
                                 const Options& opt = {}) {
    const int dv = c.head_dim_v();
    out_buf = Buffer(out_dtype, int64_t(c.batch) * c.sq * c.heads * dv);
    lse_buf = Buffer(DType::f32, int64_t(c.batch) * c.heads * c.sq);
    out = view(out_buf, {c.batch, c.sq, c.heads, dv});
    lse = view(lse_buf, {c.batch, c.heads, c.sq});
    auto r = runs("flashattn::merge", [&] { flashattn::merge(po, pl, out, lse, opt); });
    if (r && !(out_buf.guards_intact() && lse_buf.guards_intact()))
      return ::testing::AssertionFailure() << "merge wrote outside its output buffers";
    return r;
  }
};

// Chunk boundaries over sk keys, with an empty chunk in the middle.
std::vector<std::pair<int, int>> chunks_of(int sk) {
  const int a = sk / 3, b = sk / 3, c = (2 * sk) / 3;
  return {{0, a}, {a, b}, {b, c}, {c, sk}};
}

// Options whose meaning does not depend on where a key sits (causal, windows and ALiBi are
// aligned to the end of the key range, so a chunk would see a different mask).
std::vector<Config> chunk_cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    for (DType t : {DType::f32, DType::f16, DType::bf16}) {
      c.dtype = t;
      cs.push_back(c);
    }
  };
  add(cfg(2, 65, 300, 4, 2, 64), [](Config&) {});
  add(cfg(1, 7, 1013, 8, 1, 128), [](Config& c) { c.softcap = 2.0f; });
  add(cfg(2, 129, 200, 2, 2, 40, 96), [](Config& c) { c.scale = 0.5f; });
  add(cfg(1, 1, 4099, 4, 1, 256), [](Config& c) { c.causal = true; });  // one query: every chunk sees all its keys
  return cs;
}

class MergeChunks : public ::testing::TestWithParam<Config> {};

// Chunks from the oracle: merge (fp32 math) must reproduce the oracle over all keys; an
// fp16/bf16 output is the fp32 merge rounded once.
TEST_P(MergeChunks, OracleChunksMatchFullOracle) {
  Config c = GetParam();
  const DType out_dtype = c.dtype;
  c.dtype = DType::f32;  // the oracle's inputs; the dtype under test is merge's output
  Problem p(c, test_seed());
  const auto chunks = chunks_of(c.sk);
  Partials parts(int(chunks.size()), c);
  for (size_t s = 0; s < chunks.size(); ++s) {
    auto r = ref::forward(p.q, key_slice(p.k, chunks[s].first, chunks[s].second),
                          key_slice(p.v, chunks[s].first, chunks[s].second), p.opt);
    if (chunks[s].first == chunks[s].second)  // the empty chunk: LSE -inf, and garbage in O
      for (double& x : r.out) x = std::nan("");
    parts.set(int(s), r.out, r.lse);
  }
  const auto full = p.oracle_forward();
  Merged m32, m;
  ASSERT_TRUE(m32.run(parts.out, parts.lse, c, DType::f32));
  EXPECT_TRUE(close_rel("O", to_dense(m32.out), full.out));
  EXPECT_TRUE(close_rel("LSE", to_dense(m32.lse), full.lse));
  if (out_dtype != DType::f32) {
    ASSERT_TRUE(m.run(parts.out, parts.lse, c, out_dtype));
    std::vector<double> rounded = to_dense(m32.out);
    for (double& x : rounded)
      x = out_dtype == DType::f16 ? f16_bits_to_float(float_to_f16_bits(float(x)))
                                  : bf16_bits_to_float(float_to_bf16_bits(float(x)));
    EXPECT_EQ(to_dense(m.out), rounded) << "the " << short_name(out_dtype) << " output is not the fp32 merge rounded";
    EXPECT_EQ(to_dense(m.lse), to_dense(m32.lse));
  }
}

// Chunks from our forward on k/v slices (in the input dtype, widened to fp32 partials): the
// merge matches the oracle under the dtype's rule and our own full forward.
TEST_P(MergeChunks, ForwardChunksMatchFullForward) {
  const Config c = GetParam();
  Problem p(c, test_seed());
  const auto chunks = chunks_of(c.sk);
  Partials parts(int(chunks.size()), c);
  const int dv = c.head_dim_v();
  for (size_t s = 0; s < chunks.size(); ++s) {
    Buffer ob(c.dtype, int64_t(c.batch) * c.sq * c.heads * dv), lb(DType::f32, int64_t(c.batch) * c.heads * c.sq);
    const Tensor o = view(ob, {c.batch, c.sq, c.heads, dv}), l = view(lb, {c.batch, c.heads, c.sq});
    ASSERT_TRUE(runs("forward on chunk " + std::to_string(s), [&] {
      flashattn::forward(p.q, key_slice(p.k, chunks[s].first, chunks[s].second),
                         key_slice(p.v, chunks[s].first, chunks[s].second), o, l, p.opt);
    }));
    parts.set(int(s), to_dense(o), to_dense(l));
  }
  Merged m;
  ASSERT_TRUE(m.run(parts.out, parts.lse, c, c.dtype));
  ASSERT_TRUE(p.forward());
  const auto full = p.oracle_forward();
  Problem::Baseline base;
  ASSERT_TRUE(p.baseline(base, false));
  const auto mo = to_dense(m.out), ml = to_dense(m.lse);
  EXPECT_TRUE(close("O", c.dtype, mo, &base.out, full.out));
  EXPECT_TRUE(close("LSE", c.dtype, ml, &base.lse, full.lse));
  EXPECT_TRUE(agree("O merged vs full forward", c.dtype, mo, to_dense(p.out), &base.out, full.out));
  EXPECT_TRUE(agree("LSE merged vs full forward", c.dtype, ml, to_dense(p.lse), &base.lse, full.lse));
}

INSTANTIATE_TEST_SUITE_P(Cases, MergeChunks, ::testing::ValuesIn(chunk_cases()),
                         [](const auto& info) { return info.param.name(); });

// Rows for which one split saw no key (LSE -inf, NaN output) take the other splits' result;
// rows that no split saw are O = 0, LSE = -inf.
TEST(Merge, RowsWithoutKeysInASplitContributeNothing) {
  Config c = cfg(2, 33, 100, 4, 2, 64);
  Problem p(c, test_seed());
  const int a = 37;
  const auto ra = ref::forward(p.q, key_slice(p.k, 0, a), key_slice(p.v, 0, a), p.opt);
  auto rb = ref::forward(p.q, key_slice(p.k, a, c.sk), key_slice(p.v, a, c.sk), p.opt);
  const auto full = p.oracle_forward();
  const int dv = c.head_dim_v();
  auto row_of = [&](int64_t lse_i) {  // lse index (b, h, i) -> (b*sq + i, h)
    const int64_t i = lse_i % c.sq, h = lse_i / c.sq % c.heads, b = lse_i / (int64_t(c.sq) * c.heads);
    return std::pair{b * c.sq + i, h};
  };
  // Split 1 "saw no key" for every third row; split 0 is also empty for every ninth row.
  auto ra_mod = ra;
  std::vector<double> want_out = full.out, want_lse = full.lse;
  for (int64_t li = 0; li < int64_t(full.lse.size()); ++li) {
    if (li % 3 != 0) continue;
    const auto [r, h] = row_of(li);
    rb.lse[size_t(li)] = -kInf;
    for (int x = 0; x < dv; ++x) rb.out[size_t((r * c.heads + h) * dv + x)] = std::nan("");
    want_lse[size_t(li)] = ra.lse[size_t(li)];
    for (int x = 0; x < dv; ++x) want_out[size_t((r * c.heads + h) * dv + x)] = ra.out[size_t((r * c.heads + h) * dv + x)];
    if (li % 9 == 0) {
      ra_mod.lse[size_t(li)] = -kInf;
      for (int x = 0; x < dv; ++x) ra_mod.out[size_t((r * c.heads + h) * dv + x)] = std::nan("");
      want_lse[size_t(li)] = -kInf;
      for (int x = 0; x < dv; ++x) want_out[size_t((r * c.heads + h) * dv + x)] = 0.0;
    }
  }
  Partials parts(2, c);
  parts.set(0, ra_mod.out, ra_mod.lse);
  parts.set(1, rb.out, rb.lse);
  for (DType t : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(short_name(t));
    Merged m;
    ASSERT_TRUE(m.run(parts.out, parts.lse, c, t));
    const auto mo = to_dense(m.out), ml = to_dense(m.lse);
    if (t == DType::f32) {
      EXPECT_TRUE(close_rel("O", mo, want_out));
      EXPECT_TRUE(close_rel("LSE", ml, want_lse));
    }
    EXPECT_TRUE(masked_rows_exact(mo, ml, want_lse, int64_t(c.batch) * c.sq, c.heads, dv,
                                  [&](int64_t r, int h) { return (r / c.sq * c.heads + h) * c.sq + r % c.sq; }));
    for (double x : mo) ASSERT_FALSE(std::isnan(x)) << "NaN from a split that saw no key leaked into O";
  }
}

// The closed form in fp64 on synthetic partials: LSE = log sum exp(LSE_c), O = sum exp(LSE_c - LSE) O_c,
// with strided inputs and outputs (padding that must stay untouched) and many splits.
TEST(Merge, MatchesClosedFormWithStrides) {
  const int S = 7, B = 2, SQ = 13, H = 3, DV = 40;
  Rng rng(test_seed());
  // partial_out (S, B, SQ, H, DV) with padded head and row strides; partial_lse (S, B, H, SQ) as
  // a transposed (S, B, SQ, H) buffer, so its last dimension is strided.
  const int64_t hs = DV + 8, rs = H * hs + 3, bs = SQ * rs + 5, ss = B * bs + 1;
  Buffer po_buf(DType::f32, S * ss), pl_buf(DType::f32, S * B * SQ * H);
  const Tensor po = view(po_buf, {S, B, SQ, H, DV}, {ss, bs, rs, hs, 1});
  const Tensor pl = view(pl_buf, {S, B, H, SQ}, {B * SQ * H, SQ * H, 1, H});
  fill_normal(po, rng);
  fill_uniform(pl, rng, -20.0, 20.0);
  // a few -inf (with NaN output) entries, and one row no split saw
  std::vector<std::array<int64_t, 4>> empty;
  for (int s = 0; s < S; ++s) empty.push_back({s, 1, 2, 5});  // (split, b, h, i): no split saw it
  for (int k = 0; k < 20; ++k)
    empty.push_back({int64_t(rng.next() % S), int64_t(rng.next() % B), int64_t(rng.next() % H), int64_t(rng.next() % SQ)});
  for (auto [s, b, h, i] : empty) {
    static_cast<float*>(pl.data)[s * pl.stride[0] + b * pl.stride[1] + h * pl.stride[2] + i * pl.stride[3]] = -INFINITY;
    for (int x = 0; x < DV; ++x)
      static_cast<float*>(po.data)[s * po.stride[0] + b * po.stride[1] + i * po.stride[2] + h * po.stride[3] + x] = NAN;
  }
  const auto pod = to_dense(po), pld = to_dense(pl);
  std::vector<double> want_out(size_t(B * SQ * H * DV), 0.0), want_lse(size_t(B * H * SQ), -kInf);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < SQ; ++i) {
        auto lse_c = [&](int s) { return pld[size_t(((s * B + b) * H + h) * SQ + i)]; };
        double mx = -kInf;
        for (int s = 0; s < S; ++s) mx = std::max(mx, lse_c(s));
        if (mx == -kInf) continue;
        double sum = 0;
        for (int s = 0; s < S; ++s) sum += std::exp(lse_c(s) - mx);
        const double lse = mx + std::log(sum);
        want_lse[size_t((b * H + h) * SQ + i)] = lse;
        for (int s = 0; s < S; ++s) {
          if (lse_c(s) == -kInf) continue;
          const double w = std::exp(lse_c(s) - lse);
          for (int x = 0; x < DV; ++x)
            want_out[size_t(((b * SQ + i) * H + h) * DV + x)] += w * pod[size_t((((s * B + b) * SQ + i) * H + h) * DV + x)];
        }
      }
  // strided outputs: out with a padded row stride, lse with a padded head stride
  const int64_t ors = H * DV + 9, ols = SQ + 2;
  Buffer out_buf(DType::f32, B * SQ * ors), lse_buf(DType::f32, B * H * ols);
  const Tensor out = view(out_buf, {B, SQ, H, DV}, {SQ * ors, ors, DV, 1});
  const Tensor lse = view(lse_buf, {B, H, SQ}, {H * ols, ols, 1});
  const auto ob = out_buf.snapshot(), lb = lse_buf.snapshot();
  for (int threads : {1, 2}) {
    Options opt;
    opt.num_threads = threads;
    ASSERT_TRUE(runs("merge", [&] { flashattn::merge(po, pl, out, lse, opt); }));
    EXPECT_TRUE(close_rel("O", to_dense(out), want_out));
    EXPECT_TRUE(close_rel("LSE", to_dense(lse), want_lse));
    EXPECT_TRUE(out_buf.guards_intact() && lse_buf.guards_intact());
    EXPECT_TRUE(untouched_outside(out_buf, {out}, ob));
    EXPECT_TRUE(untouched_outside(lse_buf, {lse}, lb));
  }
}

// LSEs far from zero (scores of hundreds): no overflow, no NaN, and the weights stay accurate.
TEST(Merge, LargeLseMagnitudes) {
  const int S = 3, B = 1, SQ = 4, H = 2, DV = 16;
  Rng rng(test_seed());
  for (double centre : {-2000.0, 800.0}) {
    Buffer po_buf(DType::f32, S * B * SQ * H * DV), pl_buf(DType::f32, S * B * H * SQ);
    const Tensor po = view(po_buf, {S, B, SQ, H, DV}), pl = view(pl_buf, {S, B, H, SQ});
    fill_normal(po, rng);
    fill_uniform(pl, rng, centre - 3, centre + 3);
    Buffer ob(DType::f32, B * SQ * H * DV), lb(DType::f32, B * H * SQ);
    const Tensor out = view(ob, {B, SQ, H, DV}), lse = view(lb, {B, H, SQ});
    ASSERT_TRUE(runs("merge", [&] { flashattn::merge(po, pl, out, lse); }));
    const auto pod = to_dense(po), pld = to_dense(pl);
    std::vector<double> want_out(size_t(B * SQ * H * DV), 0.0), want_lse(size_t(B * H * SQ));
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < SQ; ++i) {
        double mx = -kInf, sum = 0;
        for (int s = 0; s < S; ++s) mx = std::max(mx, pld[size_t((s * H + h) * SQ + i)]);
        for (int s = 0; s < S; ++s) sum += std::exp(pld[size_t((s * H + h) * SQ + i)] - mx);
        want_lse[size_t(h * SQ + i)] = mx + std::log(sum);
        for (int s = 0; s < S; ++s)
          for (int x = 0; x < DV; ++x)
            want_out[size_t((i * H + h) * DV + x)] += std::exp(pld[size_t((s * H + h) * SQ + i)] - mx) / sum *
                                                      pod[size_t(((s * SQ + i) * H + h) * DV + x)];
      }
    SCOPED_TRACE("LSE around " + std::to_string(centre));
    EXPECT_TRUE(close_rel("O", to_dense(out), want_out));
    EXPECT_TRUE(close_rel("LSE", to_dense(lse), want_lse));
  }
}

// One split: the merge is a copy.
TEST(Merge, SingleSplitIsACopy) {
  const int B = 2, SQ = 5, H = 3, DV = 24;
  Rng rng(test_seed());
  Buffer po_buf(DType::f32, B * SQ * H * DV), pl_buf(DType::f32, B * H * SQ);
  const Tensor po = view(po_buf, {1, B, SQ, H, DV}), pl = view(pl_buf, {1, B, H, SQ});
  fill_normal(po, rng);
  fill_uniform(pl, rng, -5, 5);
  Buffer ob(DType::f32, B * SQ * H * DV), lb(DType::f32, B * H * SQ);
  const Tensor out = view(ob, {B, SQ, H, DV}), lse = view(lb, {B, H, SQ});
  ASSERT_TRUE(runs("merge", [&] { flashattn::merge(po, pl, out, lse); }));
  EXPECT_TRUE(close_rel("O", to_dense(out), to_dense(po), 1e-6));
  EXPECT_TRUE(close_rel("LSE", to_dense(lse), to_dense(pl), 1e-7));
}

}  // namespace
}  // namespace fa_test
