// Shared test helpers: guarded host buffers, strided views, seeded random inputs, NaN poison,
// dense read-back and the docs/DESIGN.md §5 tolerance checks.
//
// Every check compares against the fp64 oracle (ref::forward / ref::backward):
//   fp32:      max|ours - ref| / max|ref| <= 1e-5
//   fp16/bf16: max|ours - ref| <= 2 * max|base - ref| + atol, with base = the standard attention
//              in the input dtype (flashattn::standard) and atol = kAtolRel * max|ref| (see below).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/knobs.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"

namespace fa_test {

// Changes the library's knobs (core/knobs.h: read from the environment once per process) for its
// lifetime, so a test can steer the dispatch in-process: ScopedKnobs k([](flashattn::Knobs& k) {...}).
class ScopedKnobs {
 public:
  template <typename Change>
  explicit ScopedKnobs(Change&& change) : saved_(flashattn::knobs_for_testing()) {
    change(flashattn::knobs_for_testing());
  }
  ~ScopedKnobs() { flashattn::knobs_for_testing() = saved_; }
  ScopedKnobs(const ScopedKnobs&) = delete;
  ScopedKnobs& operator=(const ScopedKnobs&) = delete;

 private:
  flashattn::Knobs saved_;
};

namespace ref = flashattn::ref;

using flashattn::Device;
using flashattn::DType;
using flashattn::Options;
using flashattn::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- tolerances ----------------------------------------------------------------------------
// fp32 on the CPU: relative error against the fp64 oracle (docs/DESIGN.md §5).
constexpr double kFp32RelTol = 1e-5;
// fp16/bf16: atol = kAtolRel * max|ref|. Storing a result in the dtype alone costs up to half an
// ulp, i.e. 2^-11 * |x| (fp16) or 2^-8 * |x| (bf16); the baseline can be exact where ours still
// pays that rounding (seqlen_k = 1, a single visible key), so atol is ~2x that unavoidable error.
constexpr double kAtolRelF16 = 1e-3;
constexpr double kAtolRelBf16 = 1e-2;
double atol_rel(DType t);
const char* short_name(DType t);

// ---- dtype conversions (the compiler's _Float16 and a bit-exact bf16, independent of core/half.h)
float f16_bits_to_float(uint16_t bits);
uint16_t float_to_f16_bits(float f);
float bf16_bits_to_float(uint16_t bits);
uint16_t float_to_bf16_bits(float f);
double load(const Tensor& t, int64_t offset);  // element at `offset` (elements) as double

// ---- memory --------------------------------------------------------------------------------
// Host memory for tensor views, 64-byte aligned, with guard bands on both sides that every
// check verifies (a kernel writing outside its output buffers fails the test). Move-only: the
// views point into it.
class Buffer {
 public:
  Buffer() = default;
  Buffer(DType dtype, int64_t numel);
  ~Buffer();
  Buffer(Buffer&&) = default;
  Buffer& operator=(Buffer&&);
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() { return raw_.data() + offset_; }
  const void* data() const { return raw_.data() + offset_; }
  DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return size_t(numel_) * flashattn::dtype_size(dtype_); }

  void poison();  // every element NaN (int32: 0x7fc00000, still a "wrong" value for cu_seqlens)
  std::vector<uint8_t> snapshot() const;  // the bytes of the data region
  bool guards_intact() const;

 private:
  static constexpr size_t kGuard = 256;
  static constexpr uint8_t kGuardByte = 0xA5;
  DType dtype_ = DType::f32;
  int64_t numel_ = 0;
  std::vector<uint8_t> raw_;
  size_t offset_ = 0;
};

// A view into `buf` starting `offset` elements in. Empty stride = dense row-major.
Tensor view(Buffer& buf, std::vector<int64_t> shape, std::vector<int64_t> stride = {},
            int64_t offset = 0);
Tensor view_raw(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> stride = {});

// Calls fn(element offset) for every element of t in logical row-major order.
void for_each_offset(const Tensor& t, const std::function<void(int64_t)>& fn);
// The values of t in logical row-major order (for a (b, s, h, d) view: the oracle's layout).
std::vector<double> to_dense(const Tensor& t);
// Elements of `buf` outside every view in `views` still hold their bytes from `before`.
::testing::AssertionResult untouched_outside(const Buffer& buf, const std::vector<Tensor>& views,
                                             const std::vector<uint8_t>& before);

// ---- random inputs -------------------------------------------------------------------------
// Fixed but varied seeds: derived from the running test's full name (so every test and every
// parameter draws different data, and a rerun draws the same), xor FLASHATTN_TEST_SEED if set.
uint64_t test_seed(const std::string& salt = "");

class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double normal() { return normal_(gen_); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  uint64_t next() { return gen_(); }

 private:
  std::mt19937_64 gen_;
  std::normal_distribution<double> normal_{0.0, 1.0};
};

// N(0, scale^2) values stored in t's dtype. quantum > 0 rounds them to multiples of quantum first.
void fill_normal(const Tensor& t, Rng& rng, double scale = 1.0, double quantum = 0.0);
void fill_uniform(const Tensor& t, Rng& rng, double lo, double hi);
void store(const Tensor& t, int64_t offset, double value);  // rounds to t's dtype (nearest even)

// ---- comparisons ---------------------------------------------------------------------------
struct Diff {
  double max_abs = 0;   // max |a - b|; +inf where one is non-finite and they differ
  double max_ref = 0;   // max |b| over finite b
  int64_t worst = -1;   // index of max_abs
  double a_worst = 0, b_worst = 0;
  int64_t nonfinite_mismatches = 0;
};
Diff diff(const std::vector<double>& a, const std::vector<double>& b);
std::string describe(const Diff& d);

// fp32 rule: max|ours - ref| / max|ref| <= rel_tol.
::testing::AssertionResult close_rel(const std::string& what, const std::vector<double>& ours,
                                     const std::vector<double>& ref, double rel_tol = kFp32RelTol);
// fp16/bf16 rule: max|ours - ref| <= 2 * max|base - ref| + atol_rel * max|ref|.
::testing::AssertionResult close_to_baseline(const std::string& what, const std::vector<double>& ours,
                                             const std::vector<double>& base,
                                             const std::vector<double>& ref, double atol_rel);
// The rule of dtype `t`. fp32 with a (fp32) baseline: max|ours - ref| <= max(1e-5 max|ref|,
// 2 max|base - ref|). The second term only matters for ill-conditioned inputs (scores in the
// tens or hundreds: the fp32 rounding of a score s alone moves exp(s) by |s| 2^-24, e.g. 5e-6 at
// s = 80), where the fp32 standard attention itself misses 1e-5; for ordinary inputs its error
// is ~1e-6 and the 1e-5 rule decides.
::testing::AssertionResult close(const std::string& what, DType t, const std::vector<double>& ours,
                                 const std::vector<double>* base, const std::vector<double>& ref);
::testing::AssertionResult close_rel_or_baseline(const std::string& what, const std::vector<double>& ours,
                                                 const std::vector<double>& base, const std::vector<double>& ref);
// Two results of ours (e.g. different num_splits) agree as tightly as each must agree with ref:
// fp32: max|a - b| / max|ref| <= 2 * rel_tol; low precision: max|a - b| <= the sum of both bounds.
::testing::AssertionResult agree(const std::string& what, DType t, const std::vector<double>& a,
                                 const std::vector<double>& b, const std::vector<double>* base,
                                 const std::vector<double>& ref);

// Rows the oracle reports as fully masked (LSE -inf) must give exactly O = 0 and LSE = -inf.
// out: (rows, heads, dv) dense; lse index of (row r, head h) given by lse_index.
::testing::AssertionResult masked_rows_exact(const std::vector<double>& out, const std::vector<double>& lse,
                                             const std::vector<double>& ref_lse, int64_t rows, int heads,
                                             int dv, const std::function<int64_t(int64_t, int)>& lse_index,
                                             int64_t* masked_count = nullptr);

// Runs fn; an exception's message becomes a test failure naming `what` instead of aborting the
// whole test body with an anonymous "C++ exception thrown".
::testing::AssertionResult runs(const std::string& what, const std::function<void()>& fn);

// ---- attention problems --------------------------------------------------------------------
// How q/k/v (and their gradients / out) lie in memory.
enum class Layout {
  dense,   // (b, s, h, d) contiguous
  packed,  // slices of one (b, s, h + 2 hk, d) qkv buffer (sq == sk, d == dv); grads likewise
  padded,  // every dimension strided with gaps; outputs too (the gaps must stay untouched)
  bhsd,    // (b, h, s, d) memory order viewed as (b, s, h, d)
};
enum class Alibi { none, heads, batch_heads };

struct Config {
  int batch = 1, sq = 1, sk = 1, heads = 1, heads_k = 1, d = 64, dv = 0;  // dv 0 = d
  DType dtype = DType::f32;
  Layout layout = Layout::dense;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0;
  Alibi alibi = Alibi::none;
  std::optional<float> scale;
  int num_splits = 0, num_threads = 0;
  bool deterministic = false;
  double quantum = 0;  // > 0: inputs are multiples of it (exact finite differences)
  // Varlen problems only (VarlenProblem): per-sequence lengths, and packed rows past the last
  // sequence (present in the tensors, owned by no sequence: they must stay untouched).
  std::vector<int> lens_q, lens_k;
  int extra_rows = 0;

  int head_dim_v() const { return dv > 0 ? dv : d; }
  std::string name() const;  // a valid gtest name
};
inline void PrintTo(const Config& c, std::ostream* os) { *os << c.name(); }

// A fixed-length problem of this shape (dv 0 = d), every other field at its default.
inline Config cfg(int batch, int sq, int sk, int heads, int heads_k, int d, int dv = 0) {
  Config c;
  c.batch = batch;
  c.sq = sq;
  c.sk = sk;
  c.heads = heads;
  c.heads_k = heads_k;
  c.d = d;
  c.dv = dv;
  return c;
}

// Each config once per dtype (fp32, fp16, bf16).
inline std::vector<Config> for_all_dtypes(const std::vector<Config>& cs) {
  std::vector<Config> r;
  for (DType t : {DType::f32, DType::f16, DType::bf16})
    for (Config c : cs) {
      c.dtype = t;
      r.push_back(c);
    }
  return r;
}

// Owns the inputs (seeded random) and the outputs of one fixed-length problem.
class Problem {
 public:
  Problem(const Config& c, uint64_t seed);
  Problem(const Problem&) = delete;

  const Config c;
  Options opt;
  Tensor q, k, v, dout, out, lse, dq, dk, dv;

  // Poison outputs, run ours, verify guards and gaps. Return an AssertionResult for EXPECT_TRUE.
  ::testing::AssertionResult forward();
  ::testing::AssertionResult backward();  // needs forward() first (uses its out and lse); dq/dk/dv exist from here on

  ref::ForwardResult oracle_forward() const;
  ref::BackwardResult oracle_backward() const;

  // The standard attention in the input dtype on the same inputs (dense outputs).
  struct Baseline {
    std::vector<double> out, lse, dq, dk, dv;
  };
  ::testing::AssertionResult baseline(Baseline& b, bool with_backward) const;

  int64_t rows_q() const { return int64_t(c.batch) * c.sq; }
  int64_t lse_index(int64_t row, int h) const {
    return (row / c.sq * c.heads + h) * c.sq + row % c.sq;
  }

 private:
  Buffer qkv_buf_, q_buf_, k_buf_, v_buf_, dout_buf_, alibi_buf_;
  Buffer out_buf_, lse_buf_, dqkv_buf_, dq_buf_, dk_buf_, dv_buf_;
  void make_views(Buffer* packed, Buffer& qb, Buffer& kb, Buffer& vb, Tensor& tq, Tensor& tk, Tensor& tv);
};

// A variable-length batch: q (total_q, heads, d), k/v (total_k, heads_k, d / dv) with
// cu_seqlens from c.lens_q / c.lens_k, plus c.extra_rows rows past the last sequence.
// Layouts: dense, packed (lens_q == lens_k, d == dv), padded.
class VarlenProblem {
 public:
  VarlenProblem(const Config& c, uint64_t seed);
  VarlenProblem(const VarlenProblem&) = delete;

  const Config c;
  Options opt;
  flashattn::VarlenLayout layout;
  Tensor q, k, v, dout, out, lse, dq, dk, dv;
  std::vector<int64_t> cu_q, cu_k;  // host copies of cu_seqlens

  int batch() const { return int(c.lens_q.size()); }
  int64_t used_q() const { return cu_q.back(); }  // rows owned by a sequence
  int64_t used_k() const { return cu_k.back(); }

  ::testing::AssertionResult forward();
  ::testing::AssertionResult backward();  // needs forward() first

  // Results in the oracle's dense layout restricted to the used rows:
  //   out (used_q, heads, dv), lse (heads, used_q), dq (used_q, heads, d), dk/dv (used_k, heads_k, .)
  struct Dense {
    std::vector<double> out, lse, dq, dk, dv;
  };
  Dense ours() const;  // read back from out/lse (and dq/dk/dv when with_backward)
  Dense oracle(bool with_backward) const;
  // Each sequence run on its own through the fixed-length API (ours, or the standard baseline),
  // on views into the same packed inputs. Sequences with no key get O = 0, LSE = -inf, dQ = 0
  // without a call (the fixed-length tests cover seqlen_k = 0 themselves).
  ::testing::AssertionResult per_sequence(Dense& r, bool standard, bool with_backward) const;

 private:
  Buffer qkv_buf_, q_buf_, k_buf_, v_buf_, dout_buf_, alibi_buf_, cuq_buf_, cuk_buf_;
  Buffer out_buf_, lse_buf_, dqkv_buf_, dq_buf_, dk_buf_, dv_buf_;
  bool with_grads_ = false;
  std::function<void()> make_grads_;  // the gradient buffers, allocated by the first backward()
};

// Central differences of L = sum(O * G), O from `forward` (the oracle), G the dense dout values,
// with respect to every element of x (an fp32 input view that `forward` reads), step h.
// Inputs should be multiples of a power of two well above h so that x +- h is exact.
std::vector<double> fd_gradient(const Tensor& x, const std::vector<double>& g,
                                const std::function<std::vector<double>()>& forward_out, double h);

}  // namespace fa_test
