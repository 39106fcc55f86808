// The oracle itself: every other test trusts it, so it is checked against things it does not share
// code with.
//   - its fp16/bf16 input reading (core/half.h) against the compiler's _Float16 and exact bf16;
//   - its forward against a naive implementation of docs/DESIGN.md §2 written here from the spec (mask
//     bounds, softcap, ALiBi, scale, GQA), not from core/mask.h;
//   - its backward against central differences of L = sum(O * G) through its own forward;
//   - varlen against the same sequences run one at a time.
#include <cmath>

#include "common/testing.h"
#include "core/half.h"

namespace fa_test {
namespace {

// ---- fp16 / bf16 conversions -------------------------------------------------------------------

TEST(Reference, HalfConversionsDecodeEveryBitPattern) {
  int bad16 = 0, badbf = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float want16 = f16_bits_to_float(uint16_t(b)), got16 = flashattn::f16_to_float(uint16_t(b));
    if (!(want16 == got16 || (std::isnan(want16) && std::isnan(got16))) || std::signbit(want16) != std::signbit(got16))
      if (++bad16 < 5) ADD_FAILURE() << "f16_to_float(0x" << std::hex << b << ") = " << got16 << ", want " << want16;
    const float wantbf = bf16_bits_to_float(uint16_t(b)), gotbf = flashattn::bf16_to_float(uint16_t(b));
    if (!(wantbf == gotbf || (std::isnan(wantbf) && std::isnan(gotbf))))
      if (++badbf < 5) ADD_FAILURE() << "bf16_to_float(0x" << std::hex << b << ") = " << gotbf << ", want " << wantbf;
  }
  EXPECT_EQ(bad16, 0);
  EXPECT_EQ(badbf, 0);
}

TEST(Reference, HalfConversionsRoundToNearestEven) {
  Rng rng(test_seed());
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.0f, 65520.0f, 1e6f, -1e6f,
                           std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(1.5f, -25), std::ldexp(1.0f, -14),
                           std::ldexp(1023.5f, -24), 1.0f + std::ldexp(1.0f, -11), 1.0f + std::ldexp(3.0f, -11),
                           1.0f + std::ldexp(1.0f, -8), 1.0f + std::ldexp(3.0f, -8), 3.4e38f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 200000; ++i) {
    const double mag = std::exp2(rng.uniform(-30, 18));
    xs.push_back(float((rng.uniform(0, 1) < 0.5 ? -1 : 1) * mag));
  }
  int bad = 0;
  for (float x : xs) {
    const uint16_t a = flashattn::float_to_f16(x), b = float_to_f16_bits(x);
    if (a != b && ++bad < 5) ADD_FAILURE() << "float_to_f16(" << x << ") = 0x" << std::hex << a << ", want 0x" << b;
    const uint16_t c = flashattn::float_to_bf16(x), d = float_to_bf16_bits(x);
    if (c != d && ++bad < 5) ADD_FAILURE() << "float_to_bf16(" << x << ") = 0x" << std::hex << c << ", want 0x" << d;
  }
  EXPECT_EQ(bad, 0);
  EXPECT_TRUE(std::isnan(flashattn::f16_to_float(flashattn::float_to_f16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(flashattn::bf16_to_float(flashattn::float_to_bf16(std::nanf("")))));
}

// ---- the forward against docs/DESIGN.md §2, implemented independently -----------------------------------

struct Naive {
  std::vector<double> out, lse;
};

// Straight from docs/DESIGN.md §2: query i sees key j iff (wl < 0 or j >= i + sk - sq - wl) and
// (wr < 0 or j <= i + sk - sq + wr), causal = wr 0; score = scale q.k, then softcap
// c tanh(s / c), then - slope |i + sk - sq - j|; rows with no key: O = 0, LSE = -inf.
Naive naive_forward(const Problem& p) {
  const Config& c = p.c;
  const int dv = c.head_dim_v();
  const auto q = to_dense(p.q), k = to_dense(p.k), v = to_dense(p.v);
  // The API's scale is a float: the default 1/sqrt(d) is rounded to fp32 like any user value.
  const double scale = c.scale ? double(*c.scale) : double(float(1.0 / std::sqrt(double(c.d))));
  const int wr = c.causal ? 0 : c.wr;
  std::vector<double> slopes(size_t(c.batch * c.heads), 0.0);
  if (p.opt.alibi_slopes) {
    const Tensor& a = *p.opt.alibi_slopes;
    for (int b = 0; b < c.batch; ++b)
      for (int h = 0; h < c.heads; ++h)
        slopes[size_t(b * c.heads + h)] = load(a, (a.rank == 2 ? b * a.stride[0] : 0) + h);
  }
  Naive r;
  r.out.assign(size_t(c.batch * c.sq * c.heads * dv), 0.0);
  r.lse.assign(size_t(c.batch * c.heads * c.sq), -kInf);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h) {
      const int hk = h / (c.heads / c.heads_k);
      for (int i = 0; i < c.sq; ++i) {
        std::vector<double> s(size_t(c.sk), -kInf);
        double mx = -kInf;
        for (int j = 0; j < c.sk; ++j) {
          const long diag = long(i) + c.sk - c.sq;
          if (c.wl >= 0 && j < diag - c.wl) continue;
          if (wr >= 0 && j > diag + wr) continue;
          double dot = 0;
          for (int x = 0; x < c.d; ++x)
            dot += q[size_t(((b * c.sq + i) * c.heads + h) * c.d + x)] * k[size_t(((b * c.sk + j) * c.heads_k + hk) * c.d + x)];
          double sc = scale * dot;
          if (c.softcap > 0) sc = c.softcap * std::tanh(sc / c.softcap);
          sc -= slopes[size_t(b * c.heads + h)] * std::fabs(double(diag - j));
          s[size_t(j)] = sc;
          mx = std::max(mx, sc);
        }
        if (mx == -kInf) continue;
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        r.lse[size_t((b * c.heads + h) * c.sq + i)] = mx + std::log(sum);
        for (int j = 0; j < c.sk; ++j)
          for (int x = 0; x < dv; ++x)
            r.out[size_t(((b * c.sq + i) * c.heads + h) * dv + x)] +=
                s[size_t(j)] / sum * v[size_t(((b * c.sk + j) * c.heads_k + hk) * dv + x)];
      }
    }
  return r;
}

// Small problems through every option, fp32 and bf16 inputs (the oracle reads either exactly).
std::vector<Config> semantic_cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    cs.push_back(c);
    c.dtype = DType::bf16;
    cs.push_back(c);
  };
  const Config b = cfg(2, 9, 13, 4, 2, 8, 6);
  add(b, [](Config&) {});
  add(b, [](Config& c) { c.causal = true; });
  add(cfg(2, 13, 9, 4, 2, 8), [](Config& c) { c.causal = true; });  // sq > sk: rows 0..3 see nothing
  add(b, [](Config& c) { c.wl = -1, c.wr = 0; });
  add(b, [](Config& c) { c.wl = 3, c.wr = -1; });
  add(b, [](Config& c) { c.wl = 5, c.wr = 2; });
  add(cfg(1, 13, 5, 2, 1, 8), [](Config& c) { c.wl = 1, c.wr = 0; });
  add(b, [](Config& c) { c.causal = true, c.wl = 2; });
  add(b, [](Config& c) { c.softcap = 0.8f, c.scale = 1.3f; });
  add(b, [](Config& c) { c.alibi = Alibi::heads; });
  add(b, [](Config& c) { c.alibi = Alibi::batch_heads, c.causal = true; });
  add(b, [](Config& c) { c.scale = 0.2f; });
  add(cfg(1, 7, 7, 8, 1, 5), [](Config& c) { c.layout = Layout::packed, c.softcap = 2.0f, c.alibi = Alibi::heads; });
  add(b, [](Config& c) { c.layout = Layout::padded, c.wl = 4, c.wr = 1, c.alibi = Alibi::batch_heads; });
  add(b, [](Config& c) { c.layout = Layout::bhsd; });
  add(cfg(1, 1, 13, 4, 4, 8), [](Config& c) { c.causal = true; });
  add(cfg(1, 5, 0, 2, 1, 8), [](Config&) {});  // no keys at all
  return cs;
}

class ReferenceSemantics : public ::testing::TestWithParam<Config> {};

TEST_P(ReferenceSemantics, ForwardMatchesNaiveSpec) {
  const Config c = GetParam();
  Problem p(c, test_seed());
  const auto ref = p.oracle_forward();
  const Naive nv = naive_forward(p);
  EXPECT_TRUE(close_rel("O", ref.out, nv.out, 1e-12));
  EXPECT_TRUE(close_rel("LSE", ref.lse, nv.lse, 1e-12));
}

INSTANTIATE_TEST_SUITE_P(Cases, ReferenceSemantics, ::testing::ValuesIn(semantic_cases()),
                         [](const auto& info) { return info.param.name(); });

// The alignment rule spelled out once on numbers: causal with sq = 3, sk = 5 lets row 0 see keys
// 0..2 (bottom-right), and with sq = 5, sk = 3 rows 0 and 1 see nothing.
TEST(Reference, CausalIsBottomRightAligned) {
  for (auto [sq, sk] : {std::pair{3, 5}, std::pair{5, 3}}) {
    Config c = cfg(1, sq, sk, 1, 1, 4);
    c.causal = true;
    Problem p(c, test_seed());
    // k = 0 makes every visible score 0: LSE of row i = log(number of visible keys).
    for_each_offset(p.k, [&](int64_t off) { store(p.k, off, 0.0); });
    const auto ref = p.oracle_forward();
    for (int i = 0; i < sq; ++i) {
      const int visible = std::max(0, std::min(sk, i + sk - sq + 1));
      if (visible == 0)
        EXPECT_EQ(ref.lse[size_t(i)], -kInf) << "row " << i;
      else
        EXPECT_NEAR(ref.lse[size_t(i)], std::log(double(visible)), 1e-14) << "row " << i;
    }
  }
}

// ---- the backward against finite differences ------------------------------------------------

constexpr double kQuantum = 1.0 / 256;  // inputs on a 2^-8 grid: x +- 2^-14 is exact in fp32
constexpr double kStep = 1.0 / 16384;
// Central differences carry an O(h^2) truncation error (h^2 = 4e-9 times a third derivative of
// order 1-10 here), and fp64 round-off of ~1e-16 / h; 1e-6 of max|grad| is well above both and
// far below any real gradient bug (a wrong term is off by O(1)).
constexpr double kFdRelTol = 1e-6;

std::vector<Config> fd_cases() {
  std::vector<Config> cs;
  auto add = [&](Config c, auto&& tweak) {
    tweak(c);
    c.quantum = kQuantum;
    cs.push_back(c);
  };
  const Config b = cfg(1, 4, 5, 2, 1, 4, 3);
  add(b, [](Config&) {});
  add(cfg(2, 5, 3, 2, 2, 3), [](Config& c) { c.causal = true; });  // fully masked rows
  add(cfg(1, 3, 6, 4, 2, 4), [](Config& c) { c.causal = true; });
  add(cfg(1, 5, 6, 2, 1, 4), [](Config& c) { c.wl = -1, c.wr = 0; });
  add(cfg(1, 5, 6, 2, 1, 4), [](Config& c) { c.wl = 3, c.wr = -1; });
  add(cfg(1, 5, 6, 2, 1, 4), [](Config& c) { c.wl = 1, c.wr = 2; });
  add(cfg(1, 6, 4, 2, 2, 4), [](Config& c) { c.wl = 0, c.wr = 0; });
  add(b, [](Config& c) { c.softcap = 1.0f, c.scale = 1.5f; });
  add(b, [](Config& c) { c.alibi = Alibi::heads; });
  add(cfg(2, 4, 5, 2, 1, 4), [](Config& c) { c.alibi = Alibi::batch_heads, c.causal = true; });
  add(b, [](Config& c) { c.scale = 0.7f; });
  add(cfg(1, 4, 4, 4, 1, 4, 5), [](Config& c) { c.softcap = 2.0f, c.alibi = Alibi::heads, c.wl = 2, c.wr = 1; });
  add(b, [](Config& c) { c.layout = Layout::padded; });
  add(b, [](Config& c) { c.layout = Layout::bhsd; });
  add(cfg(1, 5, 5, 2, 1, 3), [](Config& c) { c.layout = Layout::packed; });
  return cs;
}

class ReferenceBackward : public ::testing::TestWithParam<Config> {};

TEST_P(ReferenceBackward, MatchesFiniteDifferences) {
  Problem p(GetParam(), test_seed());
  const auto g = to_dense(p.dout);
  const auto ref = p.oracle_backward();
  auto fwd = [&] { return p.oracle_forward().out; };
  EXPECT_TRUE(close_rel("dQ", ref.dq, fd_gradient(p.q, g, fwd, kStep), kFdRelTol));
  EXPECT_TRUE(close_rel("dK", ref.dk, fd_gradient(p.k, g, fwd, kStep), kFdRelTol));
  EXPECT_TRUE(close_rel("dV", ref.dv, fd_gradient(p.v, g, fwd, kStep), kFdRelTol));
}

INSTANTIATE_TEST_SUITE_P(Cases, ReferenceBackward, ::testing::ValuesIn(fd_cases()),
                         [](const auto& info) { return info.param.name(); });

// ---- varlen ------------------------------------------------------------------------------------

Config varlen_cfg(std::vector<int> lq, std::vector<int> lk, int heads, int heads_k, int d, int dv = 0) {
  Config c = cfg(1, 0, 0, heads, heads_k, d, dv);
  c.lens_q = std::move(lq);
  c.lens_k = std::move(lk);
  c.extra_rows = 2;
  return c;
}

TEST(Reference, VarlenBackwardMatchesFiniteDifferences) {
  for (bool causal : {false, true}) {
    Config c = varlen_cfg({3, 0, 2, 0, 4}, {2, 3, 0, 0, 5}, 2, 1, 3, 4);
    c.causal = causal;
    c.alibi = Alibi::batch_heads;
    c.quantum = kQuantum;
    SCOPED_TRACE(causal ? "causal" : "full");
    VarlenProblem p(c, test_seed(causal ? "c" : "f"));
    const auto g = to_dense(p.dout);
    const auto ref = p.oracle(true);
    auto fwd = [&] { return ref::forward(p.q, p.k, p.v, p.opt, &p.layout).out; };
    auto used = [](std::vector<double> v, size_t n) {
      v.resize(n);
      return v;
    };
    EXPECT_TRUE(close_rel("dQ", ref.dq, used(fd_gradient(p.q, g, fwd, kStep), ref.dq.size()), kFdRelTol));
    EXPECT_TRUE(close_rel("dK", ref.dk, used(fd_gradient(p.k, g, fwd, kStep), ref.dk.size()), kFdRelTol));
    EXPECT_TRUE(close_rel("dV", ref.dv, used(fd_gradient(p.v, g, fwd, kStep), ref.dv.size()), kFdRelTol));
  }
}

// Varlen with zero-length sequences (q and k both empty, either empty) equals each sequence on its
// own through the fixed-length oracle.
TEST(Reference, VarlenMatchesPerSequence) {
  Config c = varlen_cfg({5, 0, 0, 7, 1, 4}, {6, 0, 3, 7, 9, 0}, 4, 2, 8, 6);
  c.wl = 2;
  c.wr = 1;
  c.softcap = 1.5f;
  c.alibi = Alibi::batch_heads;
  VarlenProblem p(c, test_seed());
  const auto whole = p.oracle(true);
  for (int b = 0; b < p.batch(); ++b) {
    const int lq = c.lens_q[b], lk = c.lens_k[b];
    if (lq == 0) continue;
    SCOPED_TRACE("sequence " + std::to_string(b));
    auto seq = [](const Tensor& t, int64_t begin, int64_t len) {
      Tensor f = t;
      f.data = static_cast<float*>(t.data) + begin * t.stride[0];
      f.rank = 4;
      f.shape = {1, len, t.shape[1], t.shape[2], 0, 0};
      f.stride = {std::max<int64_t>(len, 1) * t.stride[0], t.stride[0], t.stride[1], 1, 0, 0};
      return f;
    };
    Options o = p.opt;
    Buffer slope(DType::f32, c.heads);
    for (int h = 0; h < c.heads; ++h)
      store(view(slope, {c.heads}), h, load(*p.opt.alibi_slopes, b * p.opt.alibi_slopes->stride[0] + h));
    o.alibi_slopes = view(slope, {c.heads});
    const auto f = ref::forward(seq(p.q, p.cu_q[b], lq), seq(p.k, p.cu_k[b], lk), seq(p.v, p.cu_k[b], lk), o);
    const auto g = ref::backward(seq(p.dout, p.cu_q[b], lq), seq(p.q, p.cu_q[b], lq), seq(p.k, p.cu_k[b], lk),
                                 seq(p.v, p.cu_k[b], lk), o);
    auto slice = [](const std::vector<double>& v, int64_t begin, int64_t n) {
      return std::vector<double>(v.begin() + begin, v.begin() + begin + n);
    };
    const int dv = c.head_dim_v();
    EXPECT_EQ(slice(whole.out, p.cu_q[b] * c.heads * dv, int64_t(lq) * c.heads * dv), f.out);
    for (int h = 0; h < c.heads; ++h)
      EXPECT_EQ(slice(whole.lse, h * p.used_q() + p.cu_q[b], lq), slice(f.lse, int64_t(h) * lq, lq));
    EXPECT_EQ(slice(whole.dq, p.cu_q[b] * c.heads * c.d, int64_t(lq) * c.heads * c.d), g.dq);
    if (lk > 0) {
      EXPECT_EQ(slice(whole.dk, p.cu_k[b] * c.heads_k * c.d, int64_t(lk) * c.heads_k * c.d), g.dk);
      EXPECT_EQ(slice(whole.dv, p.cu_k[b] * c.heads_k * dv, int64_t(lk) * c.heads_k * dv), g.dv);
    }
  }
}

}  // namespace
}  // namespace fa_test
