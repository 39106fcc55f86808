// Every rule of src/core/validate.cpp, broken one at a time: the call must throw
// flashattn::Error whose argument() names the offending argument (with non-empty expected/got),
// and must leave every buffer (outputs and inputs, guard bands included) exactly as it was.
#include <cmath>
#include <functional>
#include <limits>

#include "common/testing.h"

namespace fa_test {
namespace {

using flashattn::DeviceKind;
using flashattn::VarlenLayout;

constexpr int B = 2, SQ = 5, SK = 6, H = 4, HK = 2, D = 8, DV = 8;
constexpr int TQ = 11, TK = 12;  // varlen rows: sequences (5, 6) of q and (6, 6) of k
constexpr int SPLITS = 3;

class Validation : public ::testing::Test {
 protected:
  DType dt = DType::f16;
  // fixed length
  Buffer bq, bk, bv, bo, bl, bdo, bdq, bdk, bdv, balibi;
  Tensor q, k, v, out, lse, dout, dq, dk, dv, alibi;
  // varlen
  Buffer vbq, vbk, vbv, vbo, vbl, bcq, bck;
  Tensor vq, vk, vv, vout, vlse;
  VarlenLayout layout;
  // merge
  Buffer bpo, bpl, bmo, bml;
  Tensor po, pl, mo, ml;

  std::vector<Buffer*> all;
  std::vector<std::vector<uint8_t>> before;

  void SetUp() override {
    Rng rng(test_seed());
    auto make = [&](Buffer& b, DType t, std::vector<int64_t> shape, Tensor& view_out, bool input) {
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      b = Buffer(t, n);
      view_out = view(b, shape);
      if (input) fill_normal(view_out, rng);
      all.push_back(&b);
    };
    make(bq, dt, {B, SQ, H, D}, q, true);
    make(bk, dt, {B, SK, HK, D}, k, true);
    make(bv, dt, {B, SK, HK, DV}, v, true);
    make(bo, dt, {B, SQ, H, DV}, out, false);
    make(bl, DType::f32, {B, H, SQ}, lse, false);
    make(bdo, dt, {B, SQ, H, DV}, dout, true);
    make(bdq, dt, {B, SQ, H, D}, dq, false);
    make(bdk, dt, {B, SK, HK, D}, dk, false);
    make(bdv, dt, {B, SK, HK, DV}, dv, false);
    make(balibi, DType::f32, {B, H}, alibi, false);
    fill_uniform(alibi, rng, 0.1, 0.5);
    make(vbq, dt, {TQ, H, D}, vq, true);
    make(vbk, dt, {TK, HK, D}, vk, true);
    make(vbv, dt, {TK, HK, DV}, vv, true);
    make(vbo, dt, {TQ, H, DV}, vout, false);
    make(vbl, DType::f32, {H, TQ}, vlse, false);
    make(bcq, DType::i32, {B + 1}, layout.cu_seqlens_q, false);
    make(bck, DType::i32, {B + 1}, layout.cu_seqlens_k, false);
    set_cu(layout.cu_seqlens_q, {0, 5, 11});
    set_cu(layout.cu_seqlens_k, {0, 6, 12});
    layout.max_seqlen_q = 6;
    layout.max_seqlen_k = 6;
    make(bpo, DType::f32, {SPLITS, B, SQ, H, DV}, po, true);
    make(bpl, DType::f32, {SPLITS, B, H, SQ}, pl, true);
    make(bmo, dt, {B, SQ, H, DV}, mo, false);
    make(bml, DType::f32, {B, H, SQ}, ml, false);
    snapshot();
  }

  static void set_cu(const Tensor& t, std::vector<int32_t> vals) {
    for (size_t i = 0; i < vals.size(); ++i) static_cast<int32_t*>(t.data)[i] = vals[i];
  }
  void snapshot() {
    before.clear();
    for (Buffer* b : all) before.push_back(b->snapshot());
  }

  // The call must throw flashattn::Error naming `arg` and change no byte of any buffer.
  void expect_error(const std::string& arg, const std::function<void()>& call, int line) {
    SCOPED_TRACE("expected an error naming '" + arg + "' (test line " + std::to_string(line) + ")");
    try {
      call();
      ADD_FAILURE() << "no exception; expected flashattn::Error naming '" << arg << "'";
    } catch (const flashattn::Error& e) {
      EXPECT_EQ(e.argument(), arg) << e.what();
      EXPECT_FALSE(e.expected().empty()) << e.what();
      EXPECT_FALSE(e.got().empty()) << e.what();
      EXPECT_NE(std::string(e.what()).find("'" + arg + "'"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "expected flashattn::Error naming '" << arg << "', got another exception: " << e.what();
    }
    expect_untouched();
  }
  void expect_untouched() {
    for (size_t i = 0; i < all.size(); ++i) {
      EXPECT_TRUE(all[i]->guards_intact()) << "buffer " << i << ": guard band overwritten";
      EXPECT_TRUE(all[i]->snapshot() == before[i]) << "buffer " << i << " was modified by a rejected call";
    }
    // Leave the next check a clean start even if this one wrote something.
    snapshot();
  }

  void fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& o_, const Tensor& l_,
           const Options& opt = {}) {
    flashattn::forward(q_, k_, v_, o_, l_, opt);
  }
  void bwd(const Tensor& do_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& o_,
           const Tensor& l_, const Tensor& dq_, const Tensor& dk_, const Tensor& dv_, const Options& opt = {}) {
    flashattn::backward(do_, q_, k_, v_, o_, l_, dq_, dk_, dv_, opt);
  }
  void vfwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& o_, const Tensor& l_,
            const VarlenLayout& lay, const Options& opt = {}) {
    flashattn::forward_varlen(q_, k_, v_, o_, l_, lay, opt);
  }
};

#define EXPECT_ARG_ERROR(arg, ...) expect_error(arg, [&] { __VA_ARGS__; }, __LINE__)

Tensor with_shape(Tensor t, int dim, int64_t size) {
  t.shape[dim] = size;
  return t;
}
Tensor with_stride(Tensor t, int dim, int64_t stride) {
  t.stride[dim] = stride;
  return t;
}
Tensor with_dtype(Tensor t, DType d) {
  t.dtype = d;
  return t;
}
Tensor null(Tensor t) {
  t.data = nullptr;
  return t;
}
Tensor on_cuda(Tensor t) {
  t.device = Device::cuda(0);
  return t;
}
Tensor shifted(Tensor t, int bytes) {
  t.data = static_cast<char*>(t.data) + bytes;
  return t;
}
// The same view claiming another rank (extra dims are size 0; a rank above 6 is just a number).
Tensor with_rank(Tensor t, int rank) {
  t.rank = rank;
  return t;
}

// ---- the valid calls pass validation (else every other test here would prove nothing) --------

TEST_F(Validation, ValidInputsAreAccepted) {
  auto accepted = [](const std::function<void()>& call) -> ::testing::AssertionResult {
    try {
      call();
    } catch (const flashattn::Error& e) {
      return ::testing::AssertionFailure() << "valid call rejected: " << e.what();
    } catch (const flashattn::Unsupported&) {
      // the kernel is not there yet: validation passed, which is what this test is about
    }
    return ::testing::AssertionSuccess();
  };
  Options opt;
  opt.alibi_slopes = alibi;
  opt.causal = true;
  EXPECT_TRUE(accepted([&] { fwd(q, k, v, out, lse, opt); }));
  EXPECT_TRUE(accepted([&] { bwd(dout, q, k, v, out, lse, dq, dk, dv, opt); }));
  EXPECT_TRUE(accepted([&] { vfwd(vq, vk, vv, vout, vlse, layout); }));
  EXPECT_TRUE(accepted([&] { flashattn::merge(po, pl, mo, ml); }));
  // Allowed edge values: causal with window_right 0 or -1, softcap 0, windows of 0, size-1 last
  // dims with any stride, a (heads) alibi.
  Options edge;
  edge.causal = true;
  edge.window_right = 0;
  edge.window_left = 0;
  EXPECT_TRUE(accepted([&] { fwd(q, k, v, out, lse, edge); }));
  Options a1;
  Buffer slopes(DType::f32, H);
  Rng rng(test_seed("slopes"));
  fill_uniform(view(slopes, {H}), rng, 0.1, 0.2);
  a1.alibi_slopes = view(slopes, {H});
  EXPECT_TRUE(accepted([&] { fwd(q, k, v, out, lse, a1); }));
}

// ---- an omitted LSE (a default Tensor{}) ----------------------------------------------------

// The forward may be given no LSE: the output is the same, bit for bit, on the tiled path, the
// decode path split or not, and varlen; nothing else is written. The backward needs the LSE.
TEST_F(Validation, OmittedLseInTheForwardOnly) {
  auto same_out = [&](const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& o_, const Tensor& l_,
                      const Options& opt, const VarlenLayout* lay, const char* what) {
    SCOPED_TRACE(what);
    int64_t extent = 1;  // elements the view o_ spans: a second output with the same strides
    for (int i = 0; i < o_.rank; ++i) extent += (o_.shape[i] - 1) * o_.stride[i];
    Buffer other(dt, extent);
    Tensor o_none = o_;
    o_none.data = other.data();
    if (lay) flashattn::forward_varlen(q_, k_, v_, o_, l_, *lay, opt);
    else flashattn::forward(q_, k_, v_, o_, l_, opt);
    snapshot();
    if (lay) flashattn::forward_varlen(q_, k_, v_, o_none, Tensor{}, *lay, opt);
    else flashattn::forward(q_, k_, v_, o_none, Tensor{}, opt);
    expect_untouched();  // no store went anywhere but o_none
    EXPECT_EQ(to_dense(o_), to_dense(o_none));
  };
  Options opt;
  opt.causal = true;
  same_out(q, k, v, out, lse, opt, nullptr, "tiled");
  const Tensor q1 = with_shape(q, 1, 1), o1 = with_shape(out, 1, 1), l1 = with_shape(lse, 2, 1);
  for (int splits : {1, 3}) {
    Options d;
    d.num_splits = splits;
    same_out(q1, k, v, o1, l1, d, nullptr, splits == 1 ? "decode" : "decode, 3 splits");
  }
  same_out(vq, vk, vv, vout, vlse, opt, &layout, "varlen");

  snapshot();
  EXPECT_ARG_ERROR("lse", bwd(dout, q, k, v, out, Tensor{}, dq, dk, dv));
}

// ---- null pointers ---------------------------------------------------------------------------

TEST_F(Validation, NullPointers) {
  EXPECT_ARG_ERROR("q", fwd(null(q), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, null(k), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, null(v), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, null(out), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, null(lse)));
  EXPECT_ARG_ERROR("dout", bwd(null(dout), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, null(dq), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, null(dk), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, null(dv)));
  EXPECT_ARG_ERROR("out", bwd(dout, q, k, v, null(out), lse, dq, dk, dv));
  EXPECT_ARG_ERROR("lse", bwd(dout, q, k, v, out, null(lse), dq, dk, dv));
  VarlenLayout l = layout;
  l.cu_seqlens_q = null(l.cu_seqlens_q);
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.cu_seqlens_k = null(l.cu_seqlens_k);
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  Options opt;
  opt.alibi_slopes = Tensor{};  // set but undefined
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(null(po), pl, mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, null(pl), mo, ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, null(mo), ml));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, null(ml)));
}

// ---- ranks -----------------------------------------------------------------------------------

TEST_F(Validation, WrongRanks) {
  EXPECT_ARG_ERROR("q", fwd(with_rank(q, 0), k, v, out, lse));
  EXPECT_ARG_ERROR("q", fwd(with_rank(q, 7), k, v, out, lse));  // above kMaxRank
  EXPECT_ARG_ERROR("q", fwd(with_rank(q, 3), k, v, out, lse));
  EXPECT_ARG_ERROR("q", fwd(with_rank(q, 5), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_rank(k, 3), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, with_rank(v, 5), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_rank(out, 3), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_rank(lse, 2)));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_rank(lse, 4)));
  EXPECT_ARG_ERROR("dout", bwd(with_rank(dout, 5), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, with_rank(dq, 3), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, with_rank(dk, 5), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, with_rank(dv, 3)));
  // varlen: (total, heads, dim) and lse (heads, total_q)
  EXPECT_ARG_ERROR("q", vfwd(q, vk, vv, vout, vlse, layout));
  EXPECT_ARG_ERROR("k", vfwd(vq, k, vv, vout, vlse, layout));
  EXPECT_ARG_ERROR("v", vfwd(vq, vk, v, vout, vlse, layout));
  EXPECT_ARG_ERROR("out", vfwd(vq, vk, vv, out, vlse, layout));
  EXPECT_ARG_ERROR("lse", vfwd(vq, vk, vv, vout, lse, layout));
  VarlenLayout l = layout;
  l.cu_seqlens_q = with_rank(l.cu_seqlens_q, 2);
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.cu_seqlens_k = with_rank(l.cu_seqlens_k, 2);
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // merge
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_rank(po, 4), pl, mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_rank(pl, 3), mo, ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_rank(mo, 3), ml));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, with_rank(ml, 2)));
}

// ---- shapes ----------------------------------------------------------------------------------

TEST_F(Validation, NegativeSizes) {
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 1, -1), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(k, 0, -2), v, out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_shape(out, 2, -4), lse));
}

TEST_F(Validation, ShapeMismatches) {
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(k, 0, B + 1), with_shape(v, 0, B + 1), out, lse));  // batch
  EXPECT_ARG_ERROR("v", fwd(q, k, with_shape(v, 0, B - 1), out, lse));                       // batch
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(k, 3, D / 2), v, out, lse));                       // head_dim
  EXPECT_ARG_ERROR("v", fwd(q, k, with_shape(v, 2, 1), out, lse));                           // heads of k
  EXPECT_ARG_ERROR("v", fwd(q, k, with_shape(v, 1, SK - 1), out, lse));                      // v/k lengths
  // out: every dimension
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_shape(out, 0, 1), lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_shape(out, 1, SQ - 1), lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_shape(out, 2, H / 2), lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_shape(out, 3, DV / 2), lse));
  // lse (batch, heads, seqlen_q): every dimension, and the (b, s, h) order mistake
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_shape(lse, 0, 1)));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_shape(lse, 1, H / 2)));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_shape(lse, 2, SQ - 1)));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, view(bl, {B, SQ, H})));
  // gradients have their input's shape; dout that of out
  EXPECT_ARG_ERROR("dout", bwd(with_shape(dout, 1, SQ - 1), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, with_shape(dq, 2, H / 2), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, with_shape(dk, 1, SK - 1), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, with_shape(dv, 3, DV / 2)));
  // varlen out / lse
  EXPECT_ARG_ERROR("out", vfwd(vq, vk, vv, with_shape(vout, 0, TQ - 1), vlse, layout));
  EXPECT_ARG_ERROR("lse", vfwd(vq, vk, vv, vout, view(vbl, {TQ, H}), layout));
  EXPECT_ARG_ERROR("lse", vfwd(vq, vk, vv, vout, with_shape(vlse, 1, TQ - 1), layout));
}

TEST_F(Validation, HeadCounts) {
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 2, 0), k, v, with_shape(out, 2, 0), with_shape(lse, 1, 0)));
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(k, 2, 0), with_shape(v, 2, 0), out, lse));
  // heads % heads_k != 0: 4 query heads over 3 kv heads
  Buffer k3(dt, B * SK * 3 * D), v3(dt, B * SK * 3 * DV);
  EXPECT_ARG_ERROR("k", fwd(q, view(k3, {B, SK, 3, D}), view(v3, {B, SK, 3, DV}), out, lse));
  // more kv heads than query heads
  Buffer k8(dt, B * SK * 8 * D), v8(dt, B * SK * 8 * DV);
  EXPECT_ARG_ERROR("k", fwd(q, view(k8, {B, SK, 8, D}), view(v8, {B, SK, 8, DV}), out, lse));
}

TEST_F(Validation, HeadDims) {
  for (int64_t d : {int64_t(0), int64_t(257)}) {
    Buffer qb(dt, B * SQ * H * std::max<int64_t>(d, 1)), kb(dt, B * SK * HK * std::max<int64_t>(d, 1));
    const Tensor qd = view(qb, {B, SQ, H, d}), kd = view(kb, {B, SK, HK, d});
    EXPECT_ARG_ERROR("q", fwd(qd, kd, v, out, lse));
    Buffer vb(dt, B * SK * HK * std::max<int64_t>(d, 1)), ob(dt, B * SQ * H * std::max<int64_t>(d, 1));
    EXPECT_ARG_ERROR("v", fwd(q, k, view(vb, {B, SK, HK, d}), view(ob, {B, SQ, H, d}), lse));
  }
  // 256 is the largest head dim: accepted by validation (the call may still be unsupported)
  Buffer qb(dt, B * SQ * H * 256), kb(dt, B * SK * HK * 256), vb(dt, B * SK * HK * 256), ob(dt, B * SQ * H * 256);
  try {
    fwd(view(qb, {B, SQ, H, 256}), view(kb, {B, SK, HK, 256}), view(vb, {B, SK, HK, 256}), view(ob, {B, SQ, H, 256}), lse);
  } catch (const flashattn::Error& e) {
    ADD_FAILURE() << "head_dim 256 rejected: " << e.what();
  } catch (const flashattn::Unsupported&) {
  }
}

// Sizes beyond int range must not be truncated into valid-looking ones (heads 2^32 + 4 is not 4
// heads, head_dim 2^32 + 8 is not 8). Validation only reads the shapes, so no memory is needed.
TEST_F(Validation, HugeSizesAreNotTruncated) {
  const int64_t big = (int64_t(1) << 32);
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 2, big + H), k, v, out, lse));
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 3, big + D), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(k, 2, big + HK), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, with_shape(v, 3, big + DV), out, lse));
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 0, big + B), k, v, out, lse));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_shape(po, 3, big + H), pl, mo, ml));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_shape(po, 1, big + B), pl, mo, ml));
  // seqlen_q >= 2^31
  EXPECT_ARG_ERROR("q", fwd(with_shape(q, 1, int64_t(1) << 31), k, v, with_shape(out, 1, int64_t(1) << 31),
                            with_shape(lse, 2, int64_t(1) << 31)));
}

// ---- dtypes ----------------------------------------------------------------------------------

TEST_F(Validation, DtypeMismatches) {
  EXPECT_ARG_ERROR("q", fwd(with_dtype(q, DType::i32), with_dtype(k, DType::i32), with_dtype(v, DType::i32),
                            with_dtype(out, DType::i32), lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_dtype(k, DType::bf16), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, with_dtype(v, DType::bf16), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_dtype(out, DType::bf16), lse));
  EXPECT_ARG_ERROR("dout", bwd(with_dtype(dout, DType::bf16), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, with_dtype(dq, DType::bf16), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, with_dtype(dk, DType::bf16), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, with_dtype(dv, DType::bf16)));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_dtype(po, DType::f16), pl, mo, ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_dtype(mo, DType::i32), ml));
}

TEST_F(Validation, LseDtype) {
  // lse is fp32 whatever q is (here an fp16 buffer of the right shape)
  Buffer l16(DType::f16, B * H * SQ);
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, view(l16, {B, H, SQ})));
  EXPECT_ARG_ERROR("lse", bwd(dout, q, k, v, out, view(l16, {B, H, SQ}), dq, dk, dv));
  Buffer vl16(DType::bf16, H * TQ);
  EXPECT_ARG_ERROR("lse", vfwd(vq, vk, vv, vout, view(vl16, {H, TQ}), layout));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_dtype(pl, DType::i32), mo, ml));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, view(l16, {B, H, SQ})));
}

// ---- strides and alignment -------------------------------------------------------------------

TEST_F(Validation, NonContiguousLastDim) {
  EXPECT_ARG_ERROR("q", fwd(with_stride(q, 3, 2), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_stride(k, 3, 2), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, with_stride(v, 3, 0), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_stride(out, 3, 2), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_stride(lse, 2, 2)));
  EXPECT_ARG_ERROR("dout", bwd(with_stride(dout, 3, 2), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, with_stride(dq, 3, 2), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, with_stride(dk, 3, 2), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, with_stride(dv, 3, 2)));
  EXPECT_ARG_ERROR("q", vfwd(with_stride(vq, 2, 2), vk, vv, vout, vlse, layout));
  EXPECT_ARG_ERROR("lse", vfwd(vq, vk, vv, vout, with_stride(vlse, 1, 2), layout));
  Options opt;
  opt.alibi_slopes = with_stride(alibi, 1, 2);
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_stride(po, 4, 2), pl, mo, ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_stride(mo, 3, 2), ml));
}

TEST_F(Validation, NegativeStrides) {
  // a reversed sequence view: data points at the last row, row stride negative
  Tensor rq = q;
  rq.data = static_cast<uint16_t*>(q.data) + (SQ - 1) * q.stride[1];
  rq.stride[1] = -q.stride[1];
  EXPECT_ARG_ERROR("q", fwd(rq, k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, with_stride(k, 0, -k.stride[0]), v, out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, with_stride(out, 2, -out.stride[2]), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, with_stride(lse, 1, -lse.stride[1])));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, with_stride(dq, 1, -dq.stride[1]), dk, dv));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_stride(pl, 0, -1), mo, ml));
}

TEST_F(Validation, MisalignedPointers) {
  // one byte off a 2-byte element; two bytes off a 4-byte one
  EXPECT_ARG_ERROR("q", fwd(shifted(q, 1), k, v, out, lse));
  EXPECT_ARG_ERROR("k", fwd(q, shifted(k, 1), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, shifted(v, 1), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, shifted(out, 1), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, shifted(lse, 2)));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, shifted(dq, 1), dk, dv));
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(shifted(po, 2), pl, mo, ml));
  VarlenLayout l = layout;
  l.cu_seqlens_q = shifted(l.cu_seqlens_q, 2);
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  Options opt;
  opt.alibi_slopes = shifted(alibi, 1);
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
}

// ---- varlen ----------------------------------------------------------------------------------

TEST_F(Validation, CuSeqlens) {
  VarlenLayout l = layout;
  auto cuq = [&](std::vector<int32_t> v) {
    set_cu(layout.cu_seqlens_q, v);
    snapshot();
  };
  auto cuk = [&](std::vector<int32_t> v) {
    set_cu(layout.cu_seqlens_k, v);
    snapshot();
  };
  // wrong length: batch is taken from cu_seqlens_q, so a longer cu_seqlens_k is the mismatch
  Buffer long_cu(DType::i32, B + 2);
  set_cu(view(long_cu, {B + 2}), {0, 6, 12, 12});
  l.cu_seqlens_k = view(long_cu, {B + 2});
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.cu_seqlens_q = with_shape(l.cu_seqlens_q, 0, 0);  // length 0: not even batch + 1 = 1
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.cu_seqlens_q = with_shape(l.cu_seqlens_q, 0, B);  // batch 1 from q, but cu_seqlens_k has 3
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // wrong dtype
  l = layout;
  l.cu_seqlens_q = with_dtype(l.cu_seqlens_q, DType::f32);
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  Buffer cu64(DType::f32, 2 * (B + 1));
  l.cu_seqlens_k = view(cu64, {B + 1});
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // not contiguous
  l = layout;
  l.cu_seqlens_k = with_stride(l.cu_seqlens_k, 0, 2);
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // first value != 0
  cuq({1, 5, 11});
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, layout));
  cuq({0, 5, 11});
  cuk({2, 6, 12});
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, layout));
  // decreasing
  cuk({0, 6, 12});
  cuq({0, 5, 4});
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, layout));
  cuq({0, 5, 11});
  cuk({0, 6, 5});
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, layout));
  // last value beyond the packed rows
  cuk({0, 6, 12});
  cuq({0, 5, TQ + 1});
  l = layout;
  l.max_seqlen_q = 7;
  EXPECT_ARG_ERROR("cu_seqlens_q", vfwd(vq, vk, vv, vout, vlse, l));
  cuq({0, 5, 11});
  cuk({0, 6, TK + 1});
  l = layout;
  l.max_seqlen_k = 7;
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // also through backward_varlen
  cuk({0, 6, 12});
  cuq({0, 5, 4});
  Buffer vdq(dt, TQ * H * D), vdk(dt, TK * HK * D), vdv(dt, TK * HK * DV), vdo(dt, TQ * H * DV);
  all.insert(all.end(), {&vdq, &vdk, &vdv});
  snapshot();
  EXPECT_ARG_ERROR("cu_seqlens_q",
                   flashattn::backward_varlen(view(vdo, {TQ, H, DV}), vq, vk, vv, vout, vlse, view(vdq, {TQ, H, D}),
                                              view(vdk, {TK, HK, D}), view(vdv, {TK, HK, DV}), layout));
}

TEST_F(Validation, MaxSeqlen) {
  VarlenLayout l = layout;
  l.max_seqlen_q = 5;  // sequence 1 of q has 6 rows
  EXPECT_ARG_ERROR("max_seqlen_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.max_seqlen_k = 5;
  EXPECT_ARG_ERROR("max_seqlen_k", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.max_seqlen_q = -1;
  EXPECT_ARG_ERROR("max_seqlen_q", vfwd(vq, vk, vv, vout, vlse, l));
  l = layout;
  l.max_seqlen_k = -1;
  EXPECT_ARG_ERROR("max_seqlen_k", vfwd(vq, vk, vv, vout, vlse, l));
}

// ---- options ---------------------------------------------------------------------------------

TEST_F(Validation, AlibiShapes) {
  Options opt;
  Buffer a(DType::f32, (B + 1) * (H + 1) * 2);
  opt.alibi_slopes = view(a, {H + 1});
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = view(a, {B + 1, H});
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = view(a, {B, H + 1});
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = view(a, {H, B});  // transposed
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = view(a, {B, H, 1});
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = view(a, {HK});  // kv heads, not query heads
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  // varlen: batch comes from cu_seqlens
  opt.alibi_slopes = view(a, {B + 1, H});
  EXPECT_ARG_ERROR("alibi_slopes", vfwd(vq, vk, vv, vout, vlse, layout, opt));
  // dtype and device
  Buffer a16(DType::f16, H);
  opt.alibi_slopes = view(a16, {H});
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  opt.alibi_slopes = on_cuda(view(a, {H}));
  EXPECT_ARG_ERROR("alibi_slopes", fwd(q, k, v, out, lse, opt));
  // also checked by backward
  opt.alibi_slopes = view(a, {H + 1});
  EXPECT_ARG_ERROR("alibi_slopes", bwd(dout, q, k, v, out, lse, dq, dk, dv, opt));
}

TEST_F(Validation, Softcap) {
  for (float bad : {-1.0f, -1e-30f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Options opt;
    opt.softcap = bad;
    EXPECT_ARG_ERROR("softcap", fwd(q, k, v, out, lse, opt));
    EXPECT_ARG_ERROR("softcap", bwd(dout, q, k, v, out, lse, dq, dk, dv, opt));
  }
}

TEST_F(Validation, SoftmaxScale) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Options opt;
    opt.softmax_scale = bad;
    EXPECT_ARG_ERROR("softmax_scale", fwd(q, k, v, out, lse, opt));
  }
}

TEST_F(Validation, Windows) {
  Options opt;
  opt.window_left = -2;
  EXPECT_ARG_ERROR("window_left", fwd(q, k, v, out, lse, opt));
  opt = {};
  opt.window_right = -5;
  EXPECT_ARG_ERROR("window_right", fwd(q, k, v, out, lse, opt));
  opt = {};
  opt.causal = true;
  opt.window_right = 1;  // causal ends the window on the diagonal
  EXPECT_ARG_ERROR("window_right", fwd(q, k, v, out, lse, opt));
  EXPECT_ARG_ERROR("window_right", bwd(dout, q, k, v, out, lse, dq, dk, dv, opt));
  EXPECT_ARG_ERROR("window_right", vfwd(vq, vk, vv, vout, vlse, layout, opt));
}

TEST_F(Validation, ThreadsAndSplits) {
  Options opt;
  opt.num_threads = -1;
  EXPECT_ARG_ERROR("num_threads", fwd(q, k, v, out, lse, opt));
  EXPECT_ARG_ERROR("num_threads", flashattn::merge(po, pl, mo, ml, opt));
  opt = {};
  opt.num_splits = -1;
  EXPECT_ARG_ERROR("num_splits", fwd(q, k, v, out, lse, opt));
}

// ---- devices ---------------------------------------------------------------------------------

TEST_F(Validation, DeviceMismatch) {
  EXPECT_ARG_ERROR("k", fwd(q, on_cuda(k), v, out, lse));
  EXPECT_ARG_ERROR("v", fwd(q, k, on_cuda(v), out, lse));
  EXPECT_ARG_ERROR("out", fwd(q, k, v, on_cuda(out), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, on_cuda(lse)));
  EXPECT_ARG_ERROR("dout", bwd(on_cuda(dout), q, k, v, out, lse, dq, dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, on_cuda(dq), dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, on_cuda(dk), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, on_cuda(dv)));
  VarlenLayout l = layout;
  l.cu_seqlens_k = on_cuda(l.cu_seqlens_k);
  EXPECT_ARG_ERROR("cu_seqlens_k", vfwd(vq, vk, vv, vout, vlse, l));
  // two different GPUs
  EXPECT_ARG_ERROR("k", fwd(on_cuda(q), [&] { Tensor t = k; t.device = Device::cuda(1); return t; }(), on_cuda(v),
                            on_cuda(out), on_cuda(lse)));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, on_cuda(pl), mo, ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, on_cuda(mo), ml));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, on_cuda(ml)));
}

TEST_F(Validation, Fp32OnCuda) {
  Buffer q32(DType::f32, B * SQ * H * D), k32(DType::f32, B * SK * HK * D), v32(DType::f32, B * SK * HK * DV),
      o32(DType::f32, B * SQ * H * DV);
  all.insert(all.end(), {&q32, &k32, &v32, &o32});
  snapshot();
  EXPECT_ARG_ERROR("q", fwd(on_cuda(view(q32, {B, SQ, H, D})), on_cuda(view(k32, {B, SK, HK, D})),
                            on_cuda(view(v32, {B, SK, HK, DV})), on_cuda(view(o32, {B, SQ, H, DV})), on_cuda(lse)));
}

// A well-formed request for CUDA tensors in a build without CUDA: flashattn::Unsupported, no write.
TEST_F(Validation, CudaTensorsInCpuOnlyBuild) {
  if (flashattn::cuda_available()) GTEST_SKIP() << "this build has a usable CUDA backend";
  auto expect_unsupported = [&](const std::function<void()>& call, const char* what) {
    SCOPED_TRACE(what);
    try {
      call();
      ADD_FAILURE() << "no exception; expected flashattn::Unsupported";
    } catch (const flashattn::Unsupported& e) {
      EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "expected flashattn::Unsupported, got: " << e.what();
    }
    expect_untouched();
  };
  expect_unsupported([&] { fwd(on_cuda(q), on_cuda(k), on_cuda(v), on_cuda(out), on_cuda(lse)); }, "forward");
  expect_unsupported([&] {
    bwd(on_cuda(dout), on_cuda(q), on_cuda(k), on_cuda(v), on_cuda(out), on_cuda(lse), on_cuda(dq), on_cuda(dk),
        on_cuda(dv));
  }, "backward");
  VarlenLayout l = layout;
  l.cu_seqlens_q = on_cuda(l.cu_seqlens_q);
  l.cu_seqlens_k = on_cuda(l.cu_seqlens_k);
  expect_unsupported([&] { vfwd(on_cuda(vq), on_cuda(vk), on_cuda(vv), on_cuda(vout), on_cuda(vlse), l); },
                     "forward_varlen");
  expect_unsupported([&] { flashattn::merge(on_cuda(po), on_cuda(pl), on_cuda(mo), on_cuda(ml)); }, "merge");
  // The oracle only runs on host memory.
  EXPECT_ARG_ERROR("q", ref::forward(on_cuda(q), on_cuda(k), on_cuda(v)));
}

// ---- merge -----------------------------------------------------------------------------------

TEST_F(Validation, MergeShapes) {
  EXPECT_ARG_ERROR("partial_out", flashattn::merge(with_shape(po, 0, 0), with_shape(pl, 0, 0), mo, ml));  // no split
  // partial_lse (splits, batch, heads, seqlen_q): every dimension
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_shape(pl, 0, SPLITS - 1), mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_shape(pl, 1, B - 1), mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_shape(pl, 2, H - 1), mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, with_shape(pl, 3, SQ - 1), mo, ml));
  EXPECT_ARG_ERROR("partial_lse", flashattn::merge(po, view(bpl, {SPLITS, B, SQ, H}), mo, ml));  // (s, h) order
  // out (batch, seqlen_q, heads, head_dim_v)
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_shape(mo, 0, B - 1), ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_shape(mo, 1, SQ - 1), ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_shape(mo, 2, H - 1), ml));
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, with_shape(mo, 3, DV - 1), ml));
  // lse (batch, heads, seqlen_q)
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, with_shape(ml, 0, B - 1)));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, with_shape(ml, 1, H - 1)));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, with_shape(ml, 2, SQ - 1)));
}

// ---- empty tensors may be null ----------------------------------------------------------------

// torch hands out a null pointer for a tensor with no elements (an empty KV cache, a zero-length
// batch): such a tensor is valid, and the call computes what the other tensors say.
TEST_F(Validation, EmptyTensorsMayBeNull) {
  // No keys: every row is empty, so O = 0 and LSE = -inf.
  EXPECT_NO_THROW(fwd(q, with_shape(null(k), 1, 0), with_shape(null(v), 1, 0), out, lse));
  for (double x : to_dense(out)) EXPECT_EQ(x, 0.0);
  for (double x : to_dense(lse)) EXPECT_EQ(x, -std::numeric_limits<double>::infinity());
  snapshot();
  // No queries: nothing to compute, nothing written.
  EXPECT_NO_THROW(fwd(with_shape(null(q), 1, 0), k, v, with_shape(null(out), 1, 0), with_shape(null(lse), 2, 0)));
  expect_untouched();
  // A null pointer with elements is still an error.
  EXPECT_ARG_ERROR("k", fwd(q, with_shape(null(k), 1, 1), with_shape(v, 1, 1), out, lse));
}

// ---- outputs that share memory with inputs or with each other ----------------------------------

TEST_F(Validation, OverlappingOutputs) {
  static_assert(D == DV, "out and dq alias q and dout by shape below");
  // forward: out on q, lse on q, lse inside out
  EXPECT_ARG_ERROR("out", fwd(q, k, v, view(bq, {B, SQ, H, DV}), lse));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, view_raw(bq.data(), DType::f32, {B, H, SQ})));
  EXPECT_ARG_ERROR("lse", fwd(q, k, v, out, view_raw(bo.data(), DType::f32, {B, H, SQ})));
  // out starting inside q's last row, in one buffer; right after q is fine
  const int64_t n = int64_t(B) * SQ * H * D;
  Buffer both(dt, 2 * n);
  Tensor q2 = view(both, {B, SQ, H, D});
  Rng rng(test_seed());
  fill_normal(q2, rng);
  all.push_back(&both);
  snapshot();
  EXPECT_ARG_ERROR("out", fwd(q2, k, v, view(both, {B, SQ, H, DV}, {}, n - 1), lse));
  EXPECT_NO_THROW(fwd(q2, k, v, view(both, {B, SQ, H, DV}, {}, n), lse));
  snapshot();
  // backward: a gradient on an input, on out, or on another gradient
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, view(bdo, {B, SQ, H, D}), dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, view(bo, {B, SQ, H, D}), dk, dv));
  EXPECT_ARG_ERROR("dq", bwd(dout, q, k, v, out, lse, q, dk, dv));
  EXPECT_ARG_ERROR("dk", bwd(dout, q, k, v, out, lse, dq, view(bk, {B, SK, HK, D}), dv));
  EXPECT_ARG_ERROR("dv", bwd(dout, q, k, v, out, lse, dq, dk, view(bdk, {B, SK, HK, DV})));
  // merge: out or lse on the partials, lse inside out
  EXPECT_ARG_ERROR("out", flashattn::merge(po, pl, view_raw(bpo.data(), dt, {B, SQ, H, DV}), ml));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, view_raw(bpl.data(), DType::f32, {B, H, SQ})));
  EXPECT_ARG_ERROR("lse", flashattn::merge(po, pl, mo, view_raw(bmo.data(), DType::f32, {B, H, SQ})));
}

// The slices of one packed (batch, seqlen, 3, heads, dim) buffer interleave without sharing an
// element: packed q/k/v and packed dq/dk/dv (flash_attn's qkvpacked functions) are accepted and
// give the same bits as separate tensors; slices that do share elements are refused.
TEST_F(Validation, PackedSlicesAreAccepted) {
  constexpr int S = 7, NH = 3, HD = 16;
  const std::vector<int64_t> shape{B, S, NH, HD}, packed_stride{S * 3 * NH * HD, 3 * NH * HD, HD, 1};
  Buffer qkv(dt, int64_t(B) * S * 3 * NH * HD), dqkv(dt, int64_t(B) * S * 3 * NH * HD);
  Buffer o(dt, int64_t(B) * S * NH * HD), l(DType::f32, int64_t(B) * NH * S), g(dt, int64_t(B) * S * NH * HD);
  Rng rng(test_seed());
  fill_normal(view(qkv, {B * S * 3 * NH * HD}), rng);
  fill_normal(view(g, shape), rng);
  auto slice = [&](Buffer& b, int i) { return view(b, shape, packed_stride, int64_t(i) * NH * HD); };
  Options opt;
  opt.causal = true;
  opt.deterministic = true;
  opt.num_threads = 1;
  ASSERT_NO_THROW(fwd(slice(qkv, 0), slice(qkv, 1), slice(qkv, 2), view(o, shape), view(l, {B, NH, S}), opt));
  ASSERT_NO_THROW(bwd(view(g, shape), slice(qkv, 0), slice(qkv, 1), slice(qkv, 2), view(o, shape),
                      view(l, {B, NH, S}), slice(dqkv, 0), slice(dqkv, 1), slice(dqkv, 2), opt));

  // The same call on separate dense tensors.
  std::vector<Buffer> dense;
  for (int i = 0; i < 8; ++i) dense.emplace_back(dt, int64_t(B) * S * NH * HD);
  for (int i = 0; i < 3; ++i) {
    const Tensor src = slice(qkv, i), dst = view(dense[i], shape);
    const std::vector<double> vals = to_dense(src);
    for (size_t j = 0; j < vals.size(); ++j) store(dst, int64_t(j), vals[j]);
  }
  Buffer l2(DType::f32, int64_t(B) * NH * S);
  fwd(view(dense[0], shape), view(dense[1], shape), view(dense[2], shape), view(dense[3], shape),
      view(l2, {B, NH, S}), opt);
  bwd(view(g, shape), view(dense[0], shape), view(dense[1], shape), view(dense[2], shape), view(dense[3], shape),
      view(l2, {B, NH, S}), view(dense[4], shape), view(dense[5], shape), view(dense[6], shape), opt);
  EXPECT_EQ(to_dense(view(o, shape)), to_dense(view(dense[3], shape)));
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(to_dense(slice(dqkv, i)), to_dense(view(dense[4 + i], shape))) << "gradient " << i;

  // dk one head early: its first head is dq's last head.
  const Tensor dk_early = view(dqkv, shape, packed_stride, int64_t(NH - 1) * HD);
  try {
    bwd(view(g, shape), slice(qkv, 0), slice(qkv, 1), slice(qkv, 2), view(o, shape), view(l, {B, NH, S}),
        slice(dqkv, 0), dk_early, slice(dqkv, 2), opt);
    ADD_FAILURE() << "overlapping dq/dk slices were accepted";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "dk") << e.what();
  }
}

}  // namespace
}  // namespace fa_test
