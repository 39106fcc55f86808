#include "common/testing.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "ref/standard.h"

// Under AddressSanitizer the guard bands are poisoned: any access to them, a read as well as a
// write, is reported where it happens (without it only writes are caught, after the fact).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FA_TEST_ASAN 1
#else
#define FA_TEST_ASAN 0
#endif

namespace fa_test {

double atol_rel(DType t) {
  switch (t) {
    case DType::f16: return kAtolRelF16;
    case DType::bf16: return kAtolRelBf16;
    default: return 0.0;
  }
}

const char* short_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
  }
  return "?";
}

// ---- dtype conversions (independent of core/half.h, which the oracle uses) -----------------

float f16_bits_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return float(h);
}
uint16_t float_to_f16_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // the compiler's IEEE conversion, nearest-even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16_bits(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // nearest even
  return uint16_t(u >> 16);
}

double load(const Tensor& t, int64_t offset) {
  switch (t.dtype) {
    case DType::f32: return static_cast<const float*>(t.data)[offset];
    case DType::f16: return f16_bits_to_float(static_cast<const uint16_t*>(t.data)[offset]);
    case DType::bf16: return bf16_bits_to_float(static_cast<const uint16_t*>(t.data)[offset]);
    case DType::i32: return static_cast<const int32_t*>(t.data)[offset];
  }
  return 0;
}

// ---- memory --------------------------------------------------------------------------------

Buffer::Buffer(DType dtype, int64_t numel) : dtype_(dtype), numel_(numel) {
  raw_.assign(kGuard + 64 + bytes() + kGuard, kGuardByte);
  const auto base = reinterpret_cast<uintptr_t>(raw_.data()) + kGuard;
  offset_ = kGuard + ((64 - base % 64) % 64);
  poison();
#if FA_TEST_ASAN
  ASAN_POISON_MEMORY_REGION(raw_.data(), offset_);
  ASAN_POISON_MEMORY_REGION(raw_.data() + offset_ + bytes(), raw_.size() - offset_ - bytes());
#endif
}

Buffer& Buffer::operator=(Buffer&& o) {
#if FA_TEST_ASAN
  if (!raw_.empty()) ASAN_UNPOISON_MEMORY_REGION(raw_.data(), raw_.size());
#endif
  dtype_ = o.dtype_;
  numel_ = o.numel_;
  raw_ = std::move(o.raw_);
  offset_ = o.offset_;
  o.raw_.clear();
  o.numel_ = 0;
  return *this;
}

Buffer::~Buffer() {
#if FA_TEST_ASAN
  if (!raw_.empty()) ASAN_UNPOISON_MEMORY_REGION(raw_.data(), raw_.size());
#endif
}

void Buffer::poison() {
  uint8_t* p = raw_.data() + offset_;
  switch (dtype_) {
    case DType::f32: std::fill_n(reinterpret_cast<float*>(p), numel_, std::numeric_limits<float>::quiet_NaN()); break;
    case DType::f16: std::fill_n(reinterpret_cast<uint16_t*>(p), numel_, uint16_t(0x7e00)); break;
    case DType::bf16: std::fill_n(reinterpret_cast<uint16_t*>(p), numel_, uint16_t(0x7fc0)); break;
    case DType::i32: std::fill_n(reinterpret_cast<uint32_t*>(p), numel_, 0x7fc00000u); break;
  }
}

std::vector<uint8_t> Buffer::snapshot() const {
  const uint8_t* p = raw_.data() + offset_;
  return std::vector<uint8_t>(p, p + bytes());
}

bool Buffer::guards_intact() const {
  if (FA_TEST_ASAN) return true;  // poisoned: a touch would already have been reported
  for (size_t i = 0; i < offset_; ++i)
    if (raw_[i] != kGuardByte) return false;
  for (size_t i = offset_ + bytes(); i < raw_.size(); ++i)
    if (raw_[i] != kGuardByte) return false;
  return true;
}

Tensor view_raw(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> stride) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = Device::cpu();
  t.rank = int(shape.size());
  int64_t s = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride.empty() ? s : stride[i];
    s *= shape[i];
  }
  return t;
}

Tensor view(Buffer& buf, std::vector<int64_t> shape, std::vector<int64_t> stride, int64_t offset) {
  auto* base = static_cast<uint8_t*>(buf.data()) + offset * int64_t(flashattn::dtype_size(buf.dtype()));
  return view_raw(base, buf.dtype(), std::move(shape), std::move(stride));
}

void for_each_offset(const Tensor& t, const std::function<void(int64_t)>& fn) {
  if (t.numel() == 0) return;
  std::array<int64_t, Tensor::kMaxRank> idx{};
  while (true) {
    int64_t off = 0;
    for (int i = 0; i < t.rank; ++i) off += idx[i] * t.stride[i];
    fn(off);
    int i = t.rank - 1;
    while (i >= 0 && ++idx[i] == t.shape[i]) idx[i--] = 0;
    if (i < 0) break;
  }
}

std::vector<double> to_dense(const Tensor& t) {
  std::vector<double> r;
  r.reserve(size_t(t.numel()));
  for_each_offset(t, [&](int64_t off) { r.push_back(load(t, off)); });
  return r;
}

void store(const Tensor& t, int64_t offset, double value) {
  switch (t.dtype) {
    case DType::f32: static_cast<float*>(t.data)[offset] = float(value); break;
    case DType::f16: static_cast<uint16_t*>(t.data)[offset] = float_to_f16_bits(float(value)); break;
    case DType::bf16: static_cast<uint16_t*>(t.data)[offset] = float_to_bf16_bits(float(value)); break;
    case DType::i32: static_cast<int32_t*>(t.data)[offset] = int32_t(value); break;
  }
}

::testing::AssertionResult untouched_outside(const Buffer& buf, const std::vector<Tensor>& views,
                                             const std::vector<uint8_t>& before) {
  const size_t es = flashattn::dtype_size(buf.dtype());
  std::vector<char> covered(size_t(buf.numel()), 0);
  for (const Tensor& t : views) {
    const int64_t base = (static_cast<const uint8_t*>(t.data) - static_cast<const uint8_t*>(buf.data())) / int64_t(es);
    for_each_offset(t, [&](int64_t off) { covered[size_t(base + off)] = 1; });
  }
  const std::vector<uint8_t> now = buf.snapshot();
  int64_t changed = 0, first = -1;
  for (int64_t i = 0; i < buf.numel(); ++i) {
    if (covered[size_t(i)]) continue;
    if (std::memcmp(&now[size_t(i) * es], &before[size_t(i) * es], es) != 0) {
      if (first < 0) first = i;
      ++changed;
    }
  }
  if (changed == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << changed << " element(s) outside the output view were written (first at "
                                       << first << " of " << buf.numel() << ")";
}

// ---- random --------------------------------------------------------------------------------

uint64_t test_seed(const std::string& salt) {
  std::string name = salt;
  if (const auto* info = ::testing::UnitTest::GetInstance()->current_test_info())
    name = std::string(info->test_suite_name()) + "." + info->name() + "#" + salt;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  if (const char* env = std::getenv("FLASHATTN_TEST_SEED")) h ^= std::strtoull(env, nullptr, 0) * 0x9E3779B97F4A7C15ull;
  return h;
}

void fill_normal(const Tensor& t, Rng& rng, double scale, double quantum) {
  for_each_offset(t, [&](int64_t off) {
    double x = rng.normal() * scale;
    if (quantum > 0) x = std::nearbyint(x / quantum) * quantum;
    store(t, off, x);
  });
}

void fill_uniform(const Tensor& t, Rng& rng, double lo, double hi) {
  for_each_offset(t, [&](int64_t off) { store(t, off, rng.uniform(lo, hi)); });
}

// ---- comparisons ---------------------------------------------------------------------------

Diff diff(const std::vector<double>& a, const std::vector<double>& b) {
  Diff d;
  if (a.size() != b.size()) {
    d.max_abs = kInf;
    d.nonfinite_mismatches = 1;
    return d;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isfinite(b[i])) d.max_ref = std::max(d.max_ref, std::fabs(b[i]));
    double e;
    if (a[i] == b[i]) {
      e = 0;  // also -inf == -inf (masked LSE)
    } else if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
      e = kInf;
      ++d.nonfinite_mismatches;
    } else {
      e = std::fabs(a[i] - b[i]);
    }
    if (d.worst < 0 || e > d.max_abs) {
      d.worst = int64_t(i);
      d.max_abs = e;
      d.a_worst = a[i];
      d.b_worst = b[i];
    }
  }
  return d;
}

std::string describe(const Diff& d) {
  std::ostringstream os;
  os.precision(4);
  os << "max abs err " << d.max_abs << " (max|ref| " << d.max_ref << ") at index " << d.worst << " (got "
     << d.a_worst << ", want " << d.b_worst << ")";
  if (d.nonfinite_mismatches) os << ", " << d.nonfinite_mismatches << " non-finite mismatch(es)";
  return os.str();
}

namespace {
bool verbose() {
  static const bool v = std::getenv("FLASHATTN_TEST_VERBOSE") != nullptr;
  return v;
}
// The largest finite error of base (a baseline that breaks somewhere must not widen the bound).
double finite_max_abs(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::isfinite(a[i]) && std::isfinite(b[i])) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}
}  // namespace

::testing::AssertionResult close_rel(const std::string& what, const std::vector<double>& ours,
                                     const std::vector<double>& ref, double rel_tol) {
  const Diff d = diff(ours, ref);
  const double rel = d.max_abs / std::max(d.max_ref, double(FLT_MIN));
  if (verbose()) std::printf("  [%s] rel err %.3g (tol %.3g)\n", what.c_str(), rel, rel_tol);
  if (d.nonfinite_mismatches == 0 && rel <= rel_tol)
    return ::testing::AssertionSuccess() << what << ": rel err " << rel;
  return ::testing::AssertionFailure() << what << ": relative error " << rel << " > " << rel_tol << "; "
                                       << describe(d);
}

::testing::AssertionResult close_to_baseline(const std::string& what, const std::vector<double>& ours,
                                             const std::vector<double>& base,
                                             const std::vector<double>& ref, double atol_rel) {
  const Diff d = diff(ours, ref);
  const double base_err = finite_max_abs(base, ref);
  const double atol = atol_rel * d.max_ref;
  const double bound = 2 * base_err + atol;
  if (verbose())
    std::printf("  [%s] err %.3g  base err %.3g  atol %.3g  (ratio to bound %.2f)\n", what.c_str(), d.max_abs,
                base_err, atol, d.max_abs / bound);
  if (d.nonfinite_mismatches == 0 && d.max_abs <= bound)
    return ::testing::AssertionSuccess() << what << ": err " << d.max_abs << " <= " << bound;
  return ::testing::AssertionFailure() << what << ": max|ours - ref| " << d.max_abs << " > 2 * max|base - ref| ("
                                       << base_err << ") + atol (" << atol << ") = " << bound << "; " << describe(d);
}

::testing::AssertionResult close_rel_or_baseline(const std::string& what, const std::vector<double>& ours,
                                                 const std::vector<double>& base, const std::vector<double>& ref) {
  const Diff d = diff(ours, ref);
  const double base_err = finite_max_abs(base, ref);
  const double rel_bound = kFp32RelTol * d.max_ref, bound = std::max(rel_bound, 2 * base_err);
  if (verbose())
    std::printf("  [%s] rel err %.3g (tol %.3g)%s  (abs err %.3g, base err %.3g, max|ref| %.3g)\n", what.c_str(),
                d.max_abs / std::max(d.max_ref, double(FLT_MIN)), kFp32RelTol,
                2 * base_err > rel_bound ? "  [ill-conditioned: bound from the fp32 baseline]" : "", d.max_abs,
                base_err, d.max_ref);
  if (d.nonfinite_mismatches == 0 && d.max_abs <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max|ours - ref| " << d.max_abs << " > max(1e-5 max|ref| ("
                                       << rel_bound << "), 2 max|base_fp32 - ref| (" << 2 * base_err
                                       << ")); relative error " << d.max_abs / std::max(d.max_ref, double(FLT_MIN))
                                       << "; " << describe(d);
}

::testing::AssertionResult close(const std::string& what, DType t, const std::vector<double>& ours,
                                 const std::vector<double>* base, const std::vector<double>& ref) {
  if (t == DType::f32) return base && !base->empty() ? close_rel_or_baseline(what, ours, *base, ref) : close_rel(what, ours, ref);
  if (!base) return ::testing::AssertionFailure() << what << ": no baseline for " << short_name(t);
  return close_to_baseline(what, ours, *base, ref, atol_rel(t));
}

::testing::AssertionResult agree(const std::string& what, DType t, const std::vector<double>& a,
                                 const std::vector<double>& b, const std::vector<double>* base,
                                 const std::vector<double>& ref) {
  const Diff d = diff(a, b);
  const Diff r = diff(ref, ref);
  double bound;
  if (t == DType::f32) {
    bound = 2 * kFp32RelTol * r.max_ref;
  } else {
    if (!base) return ::testing::AssertionFailure() << what << ": no baseline";
    bound = 2 * (2 * finite_max_abs(*base, ref) + atol_rel(t) * r.max_ref);
  }
  if (d.nonfinite_mismatches == 0 && d.max_abs <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": results differ by " << d.max_abs << " > " << bound << "; "
                                       << describe(d);
}

::testing::AssertionResult masked_rows_exact(const std::vector<double>& out, const std::vector<double>& lse,
                                             const std::vector<double>& ref_lse, int64_t rows, int heads,
                                             int dv, const std::function<int64_t(int64_t, int)>& lse_index,
                                             int64_t* masked_count) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int h = 0; h < heads; ++h) {
      const int64_t li = lse_index(r, h);
      if (ref_lse[size_t(li)] != -kInf) continue;
      ++n;
      if (lse[size_t(li)] != -kInf)
        return ::testing::AssertionFailure() << "fully masked row " << r << " head " << h << ": LSE " << lse[size_t(li)]
                                             << ", want -inf";
      for (int x = 0; x < dv; ++x) {
        const double o = out[size_t((r * heads + h) * dv + x)];
        if (o != 0.0)
          return ::testing::AssertionFailure() << "fully masked row " << r << " head " << h << ": O[" << x << "] = " << o
                                               << ", want 0";
      }
    }
  }
  if (masked_count) *masked_count = n;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult runs(const std::string& what, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const flashattn::Error& e) {
    return ::testing::AssertionFailure() << what << " threw flashattn::Error: " << e.what();
  } catch (const flashattn::Unsupported& e) {
    return ::testing::AssertionFailure() << what << " threw flashattn::Unsupported: " << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << what << " threw: " << e.what();
  }
  return ::testing::AssertionSuccess();
}

// ---- attention problems --------------------------------------------------------------------

std::string Config::name() const {
  std::ostringstream os;
  os << short_name(dtype) << "_b" << batch << "_q" << sq << "_k" << sk << "_h" << heads << "_kv" << heads_k << "_d"
     << d;
  if (dv > 0 && dv != d) os << "_dv" << dv;
  if (causal) os << "_causal";
  if (wl != -1 || wr != -1) os << "_w" << (wl < 0 ? "m1" : std::to_string(wl)) << "_" << (wr < 0 ? "m1" : std::to_string(wr));
  if (softcap > 0) os << "_cap" << int(softcap * 10);
  if (alibi == Alibi::heads) os << "_alibiH";
  if (alibi == Alibi::batch_heads) os << "_alibiBH";
  if (scale) os << "_scale" << int(*scale * 1000);
  switch (layout) {
    case Layout::dense: break;
    case Layout::packed: os << "_packed"; break;
    case Layout::padded: os << "_padded"; break;
    case Layout::bhsd: os << "_bhsd"; break;
  }
  if (num_splits) os << "_splits" << num_splits;
  if (num_threads) os << "_t" << num_threads;
  if (deterministic) os << "_det";
  return os.str();
}

namespace {

struct Geometry {
  std::vector<int64_t> stride;
  int64_t numel;
};

// Strides of a (b, s, h, d) view in `layout` (packed handled by the caller).
Geometry geometry(Layout layout, int64_t b, int64_t s, int64_t h, int64_t d) {
  switch (layout) {
    case Layout::padded: {
      const int64_t hs = d + 3, rs = h * hs + 5, bs = s * rs + 7;
      return {{bs, rs, hs, 1}, b * bs};
    }
    case Layout::bhsd: return {{h * s * d, d, s * d, 1}, b * h * s * d};
    default: return {{s * h * d, h * d, d, 1}, b * s * h * d};
  }
}

Options options_of(const Config& c) {
  Options opt;
  opt.softmax_scale = c.scale;
  opt.causal = c.causal;
  opt.window_left = c.wl;
  opt.window_right = c.wr;
  opt.softcap = c.softcap;
  opt.num_splits = c.num_splits;
  opt.num_threads = c.num_threads;
  opt.deterministic = c.deterministic;
  return opt;
}

// The usual geometric ALiBi slopes, jittered per (batch, head); (batch, heads) gets a padded
// batch stride.
Tensor make_alibi(Buffer& buf, const Config& c, int batch, Rng& rng) {
  const bool per_batch = c.alibi == Alibi::batch_heads;
  const int64_t row = per_batch ? c.heads + 3 : c.heads;
  buf = Buffer(DType::f32, (per_batch ? batch : 1) * row);
  Tensor a = per_batch ? view(buf, {batch, c.heads}, {row, 1}) : view(buf, {c.heads});
  int64_t n = 0;
  for_each_offset(a, [&](int64_t off) {
    const int h = int(n++ % c.heads);
    store(a, off, std::exp2(-8.0 * (h + 1) / c.heads) * rng.uniform(0.5, 1.5));
  });
  return a;
}

bool snapshot_and_check(Buffer& buf, const std::vector<Tensor>& views, const std::vector<uint8_t>& before,
                        ::testing::AssertionResult& r, const char* what) {
  if (!buf.guards_intact()) {
    r = ::testing::AssertionFailure() << "wrote outside the buffer of " << what;
    return false;
  }
  if (auto u = untouched_outside(buf, views, before); !u) {
    r = u << " (" << what << ")";
    return false;
  }
  return true;
}

// Inputs are read-only: their bytes before and after a call must match.
class Unchanged {
 public:
  Unchanged(std::initializer_list<const Buffer*> bufs) {
    for (const Buffer* b : bufs)
      if (b->numel() > 0) saved_.emplace_back(b, b->snapshot());
  }
  ::testing::AssertionResult check(const char* call) const {
    for (size_t i = 0; i < saved_.size(); ++i)
      if (saved_[i].first->snapshot() != saved_[i].second)
        return ::testing::AssertionFailure() << call << " modified one of its inputs (input buffer " << i << ")";
    return ::testing::AssertionSuccess();
  }

 private:
  std::vector<std::pair<const Buffer*, std::vector<uint8_t>>> saved_;
};

}  // namespace

void Problem::make_views(Buffer* packed, Buffer& qb, Buffer& kb, Buffer& vb, Tensor& tq, Tensor& tk, Tensor& tv) {
  const int dvv = c.head_dim_v();
  if (packed) {
    const int64_t H = c.heads + 2 * c.heads_k;
    *packed = Buffer(c.dtype, int64_t(c.batch) * c.sq * H * c.d);
    const std::vector<int64_t> st = {c.sq * H * c.d, H * c.d, c.d, 1};
    tq = view(*packed, {c.batch, c.sq, c.heads, c.d}, st, 0);
    tk = view(*packed, {c.batch, c.sk, c.heads_k, c.d}, st, int64_t(c.heads) * c.d);
    tv = view(*packed, {c.batch, c.sk, c.heads_k, dvv}, st, int64_t(c.heads + c.heads_k) * c.d);
    return;
  }
  const Geometry gq = geometry(c.layout, c.batch, c.sq, c.heads, c.d);
  const Geometry gk = geometry(c.layout, c.batch, c.sk, c.heads_k, c.d);
  const Geometry gv = geometry(c.layout, c.batch, c.sk, c.heads_k, dvv);
  qb = Buffer(c.dtype, gq.numel);
  kb = Buffer(c.dtype, gk.numel);
  vb = Buffer(c.dtype, gv.numel);
  tq = view(qb, {c.batch, c.sq, c.heads, c.d}, gq.stride);
  tk = view(kb, {c.batch, c.sk, c.heads_k, c.d}, gk.stride);
  tv = view(vb, {c.batch, c.sk, c.heads_k, dvv}, gv.stride);
}

Problem::Problem(const Config& cfg, uint64_t seed) : c(cfg) {
  const bool packed = c.layout == Layout::packed;
  if (packed && (c.sq != c.sk || c.head_dim_v() != c.d))
    throw std::logic_error("packed layout needs sq == sk and dv == d");
  const int dvv = c.head_dim_v();
  Rng rng(seed);

  opt = options_of(c);

  make_views(packed ? &qkv_buf_ : nullptr, q_buf_, k_buf_, v_buf_, q, k, v);
  fill_normal(q, rng, 1.0, c.quantum);
  fill_normal(k, rng, 1.0, c.quantum);
  fill_normal(v, rng, 1.0, c.quantum);

  // Outputs: the same layout as the inputs (packed: dq/dk/dv are slices of one dqkv buffer,
  // allocated by the first backward()).
  const Layout out_layout = packed ? Layout::dense : c.layout;
  const Geometry go = geometry(out_layout, c.batch, c.sq, c.heads, dvv);
  out_buf_ = Buffer(c.dtype, go.numel);
  out = view(out_buf_, {c.batch, c.sq, c.heads, dvv}, go.stride);
  dout_buf_ = Buffer(c.dtype, go.numel);
  dout = view(dout_buf_, {c.batch, c.sq, c.heads, dvv}, go.stride);
  fill_normal(dout, rng, 1.0, c.quantum);
  if (c.layout == Layout::padded) {
    const int64_t hs = c.sq + 3, bs = c.heads * hs + 1;
    lse_buf_ = Buffer(DType::f32, c.batch * bs);
    lse = view(lse_buf_, {c.batch, c.heads, c.sq}, {bs, hs, 1});
  } else {
    lse_buf_ = Buffer(DType::f32, int64_t(c.batch) * c.heads * c.sq);
    lse = view(lse_buf_, {c.batch, c.heads, c.sq});
  }

  if (c.alibi != Alibi::none) opt.alibi_slopes = make_alibi(alibi_buf_, c, c.batch, rng);
}

::testing::AssertionResult Problem::forward() {
  out_buf_.poison();
  lse_buf_.poison();
  const auto out_before = out_buf_.snapshot(), lse_before = lse_buf_.snapshot();
  const Unchanged inputs{&qkv_buf_, &q_buf_, &k_buf_, &v_buf_, &alibi_buf_};
  auto r = runs("flashattn::forward", [&] { flashattn::forward(q, k, v, out, lse, opt); });
  if (!r) return r;
  if (auto u = inputs.check("forward"); !u) return u;
  if (!out_buf_.guards_intact()) return ::testing::AssertionFailure() << "forward wrote outside out's buffer";
  if (!lse_buf_.guards_intact()) return ::testing::AssertionFailure() << "forward wrote outside lse's buffer";
  if (auto u = untouched_outside(out_buf_, {out}, out_before); !u) return u << " (out)";
  if (auto u = untouched_outside(lse_buf_, {lse}, lse_before); !u) return u << " (lse)";
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Problem::backward() {
  const bool packed = c.layout == Layout::packed;
  if (!dq.defined()) make_views(packed ? &dqkv_buf_ : nullptr, dq_buf_, dk_buf_, dv_buf_, dq, dk, dv);
  std::vector<Buffer*> bufs = packed ? std::vector<Buffer*>{&dqkv_buf_} : std::vector<Buffer*>{&dq_buf_, &dk_buf_, &dv_buf_};
  std::vector<std::vector<uint8_t>> before;
  for (Buffer* b : bufs) {
    b->poison();
    before.push_back(b->snapshot());
  }
  const Unchanged inputs{&qkv_buf_, &q_buf_, &k_buf_, &v_buf_, &alibi_buf_, &dout_buf_, &out_buf_, &lse_buf_};
  auto r = runs("flashattn::backward", [&] { flashattn::backward(dout, q, k, v, out, lse, dq, dk, dv, opt); });
  if (!r) return r;
  if (auto u = inputs.check("backward"); !u) return u;
  for (size_t i = 0; i < bufs.size(); ++i) {
    if (!bufs[i]->guards_intact()) return ::testing::AssertionFailure() << "backward wrote outside a gradient buffer";
    const std::vector<Tensor> views = packed ? std::vector<Tensor>{dq, dk, dv} : std::vector<Tensor>{i == 0 ? dq : i == 1 ? dk : dv};
    if (auto u = untouched_outside(*bufs[i], views, before[i]); !u) return u << " (gradient buffer " << i << ")";
  }
  return ::testing::AssertionSuccess();
}

ref::ForwardResult Problem::oracle_forward() const { return ref::forward(q, k, v, opt); }
ref::BackwardResult Problem::oracle_backward() const { return ref::backward(dout, q, k, v, opt); }

::testing::AssertionResult Problem::baseline(Baseline& b, bool with_backward) const {
  const int dvv = c.head_dim_v();
  Buffer ob(c.dtype, int64_t(c.batch) * c.sq * c.heads * dvv), lb(DType::f32, int64_t(c.batch) * c.heads * c.sq);
  Tensor o = view(ob, {c.batch, c.sq, c.heads, dvv}), l = view(lb, {c.batch, c.heads, c.sq});
  auto r = runs("standard::forward", [&] { flashattn::standard::forward(q, k, v, o, l, opt); });
  if (!r) return r;
  b.out = to_dense(o);
  b.lse = to_dense(l);
  if (!with_backward) return r;
  Buffer gq(c.dtype, int64_t(c.batch) * c.sq * c.heads * c.d), gk(c.dtype, int64_t(c.batch) * c.sk * c.heads_k * c.d),
      gv(c.dtype, int64_t(c.batch) * c.sk * c.heads_k * dvv);
  Tensor tq = view(gq, {c.batch, c.sq, c.heads, c.d}), tk = view(gk, {c.batch, c.sk, c.heads_k, c.d}),
         tv = view(gv, {c.batch, c.sk, c.heads_k, dvv});
  r = runs("standard::backward", [&] { flashattn::standard::backward(dout, q, k, v, o, l, tq, tk, tv, opt); });
  if (!r) return r;
  b.dq = to_dense(tq);
  b.dk = to_dense(tk);
  b.dv = to_dense(tv);
  return r;
}

// ---- varlen problems ------------------------------------------------------------------------

VarlenProblem::VarlenProblem(const Config& cfg, uint64_t seed) : c(cfg) {
  if (c.lens_q.size() != c.lens_k.size() || c.lens_q.empty())
    throw std::logic_error("varlen config needs lens_q and lens_k of one length");
  const bool packed = c.layout == Layout::packed;
  if (packed && (c.lens_q != c.lens_k || c.head_dim_v() != c.d))
    throw std::logic_error("packed varlen layout needs lens_q == lens_k and dv == d");
  Rng rng(seed);
  opt = options_of(c);
  cu_q = {0};
  cu_k = {0};
  for (size_t b = 0; b < c.lens_q.size(); ++b) {
    cu_q.push_back(cu_q.back() + c.lens_q[b]);
    cu_k.push_back(cu_k.back() + c.lens_k[b]);
  }
  const int64_t tq = used_q() + c.extra_rows, tk = used_k() + c.extra_rows;
  const int dvv = c.head_dim_v();
  // (rows, heads, dim) views: dense, padded, or slices of one packed (rows, h + 2 hk, d) buffer.
  auto make3 = [=, this](Buffer* pk, Buffer& qb, Buffer& kb, Buffer& vb, Tensor& tq_, Tensor& tk_, Tensor& tv_) {
    if (pk) {
      const int64_t H = c.heads + 2 * c.heads_k;
      *pk = Buffer(c.dtype, tq * H * c.d);
      tq_ = view(*pk, {tq, c.heads, c.d}, {H * c.d, c.d, 1});
      tk_ = view(*pk, {tk, c.heads_k, c.d}, {H * c.d, c.d, 1}, int64_t(c.heads) * c.d);
      tv_ = view(*pk, {tk, c.heads_k, dvv}, {H * c.d, c.d, 1}, int64_t(c.heads + c.heads_k) * c.d);
      return;
    }
    auto one = [&](Buffer& b, Tensor& t, int64_t rows, int64_t h, int64_t d) {
      if (c.layout == Layout::padded) {
        const int64_t hs = d + 3, rs = h * hs + 5;
        b = Buffer(c.dtype, std::max<int64_t>(rows * rs, 1));
        t = view(b, {rows, h, d}, {rs, hs, 1});
      } else {
        b = Buffer(c.dtype, std::max<int64_t>(rows * h * d, 1));
        t = view(b, {rows, h, d});
      }
    };
    one(qb, tq_, tq, c.heads, c.d);
    one(kb, tk_, tk, c.heads_k, c.d);
    one(vb, tv_, tk, c.heads_k, dvv);
  };
  make3(packed ? &qkv_buf_ : nullptr, q_buf_, k_buf_, v_buf_, q, k, v);
  fill_normal(q, rng, 1.0, c.quantum);
  fill_normal(k, rng, 1.0, c.quantum);
  fill_normal(v, rng, 1.0, c.quantum);
  make_grads_ = [this, make3, packed] {
    make3(packed ? &dqkv_buf_ : nullptr, dq_buf_, dk_buf_, dv_buf_, dq, dk, dv);
  };
  const int64_t os = c.layout == Layout::padded ? c.heads * (dvv + 3) + 5 : int64_t(c.heads) * dvv;
  const int64_t hs = c.layout == Layout::padded ? dvv + 3 : dvv;
  out_buf_ = Buffer(c.dtype, std::max<int64_t>(tq * os, 1));
  out = view(out_buf_, {tq, c.heads, dvv}, {os, hs, 1});
  dout_buf_ = Buffer(c.dtype, std::max<int64_t>(tq * os, 1));
  dout = view(dout_buf_, {tq, c.heads, dvv}, {os, hs, 1});
  fill_normal(dout, rng, 1.0, c.quantum);
  const int64_t ls = c.layout == Layout::padded ? tq + 3 : tq;
  lse_buf_ = Buffer(DType::f32, std::max<int64_t>(c.heads * ls, 1));
  lse = view(lse_buf_, {c.heads, tq}, {ls, 1});

  const int B = batch();
  cuq_buf_ = Buffer(DType::i32, B + 1);
  cuk_buf_ = Buffer(DType::i32, B + 1);
  layout.cu_seqlens_q = view(cuq_buf_, {B + 1});
  layout.cu_seqlens_k = view(cuk_buf_, {B + 1});
  for (int b = 0; b <= B; ++b) {
    store(layout.cu_seqlens_q, b, double(cu_q[b]));
    store(layout.cu_seqlens_k, b, double(cu_k[b]));
  }
  layout.max_seqlen_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
  layout.max_seqlen_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
  if (c.alibi != Alibi::none) opt.alibi_slopes = make_alibi(alibi_buf_, c, B, rng);
}

::testing::AssertionResult VarlenProblem::forward() {
  out_buf_.poison();
  lse_buf_.poison();
  const auto ob = out_buf_.snapshot(), lb = lse_buf_.snapshot();
  const Unchanged inputs{&qkv_buf_, &q_buf_, &k_buf_, &v_buf_, &alibi_buf_, &cuq_buf_, &cuk_buf_};
  auto r = runs("flashattn::forward_varlen", [&] { flashattn::forward_varlen(q, k, v, out, lse, layout, opt); });
  if (!r) return r;
  if (auto u = inputs.check("forward_varlen"); !u) return u;
  // Rows past the last sequence belong to no sequence: they must keep their poison.
  Tensor used_out = out, used_lse = lse;
  used_out.shape[0] = used_q();
  used_lse.shape[1] = used_q();
  if (!snapshot_and_check(out_buf_, {used_out}, ob, r, "out")) return r;
  if (!snapshot_and_check(lse_buf_, {used_lse}, lb, r, "lse")) return r;
  return r;
}

::testing::AssertionResult VarlenProblem::backward() {
  const bool packed = c.layout == Layout::packed;
  if (!dq.defined()) make_grads_();
  std::vector<Buffer*> bufs = packed ? std::vector<Buffer*>{&dqkv_buf_} : std::vector<Buffer*>{&dq_buf_, &dk_buf_, &dv_buf_};
  std::vector<std::vector<uint8_t>> before;
  for (Buffer* b : bufs) {
    b->poison();
    before.push_back(b->snapshot());
  }
  const Unchanged inputs{&qkv_buf_, &q_buf_, &k_buf_, &v_buf_, &alibi_buf_, &cuq_buf_, &cuk_buf_,
                         &dout_buf_, &out_buf_, &lse_buf_};
  auto r = runs("flashattn::backward_varlen",
                [&] { flashattn::backward_varlen(dout, q, k, v, out, lse, dq, dk, dv, layout, opt); });
  if (!r) return r;
  if (auto u = inputs.check("backward_varlen"); !u) return u;
  with_grads_ = true;
  Tensor uq = dq, uk = dk, uv = dv;
  uq.shape[0] = used_q();
  uk.shape[0] = used_k();
  uv.shape[0] = used_k();
  for (size_t i = 0; i < bufs.size(); ++i) {
    const std::vector<Tensor> views = packed ? std::vector<Tensor>{uq, uk, uv} : std::vector<Tensor>{i == 0 ? uq : i == 1 ? uk : uv};
    if (!snapshot_and_check(*bufs[i], views, before[i], r, "a gradient")) return r;
  }
  return r;
}

namespace {
Tensor rows(Tensor t, int64_t begin, int64_t count) {  // rows [begin, begin + count) of a (rows, ...) view
  t.data = static_cast<uint8_t*>(t.data) + begin * t.stride[0] * int64_t(flashattn::dtype_size(t.dtype));
  t.shape[0] = count;
  return t;
}
// (heads, rows) lse restricted to columns [0, used)
std::vector<double> lse_cols(const std::vector<double>& lse, int heads, int64_t total, int64_t used) {
  std::vector<double> r;
  r.reserve(size_t(heads * used));
  for (int h = 0; h < heads; ++h)
    for (int64_t i = 0; i < used; ++i) r.push_back(lse[size_t(h * total + i)]);
  return r;
}
std::vector<double> head_rows(std::vector<double> v, int64_t rows, int64_t width) {
  v.resize(size_t(rows * width));
  return v;
}
}  // namespace

VarlenProblem::Dense VarlenProblem::ours() const {
  Dense d;
  d.out = to_dense(rows(out, 0, used_q()));
  Tensor l = lse;
  l.shape[1] = used_q();
  d.lse = to_dense(l);
  if (with_grads_) {
    d.dq = to_dense(rows(dq, 0, used_q()));
    d.dk = to_dense(rows(dk, 0, used_k()));
    d.dv = to_dense(rows(dv, 0, used_k()));
  }
  return d;
}

VarlenProblem::Dense VarlenProblem::oracle(bool with_backward) const {
  Dense d;
  const int dvv = c.head_dim_v();
  const auto f = ref::forward(q, k, v, opt, &layout);
  d.out = head_rows(f.out, used_q(), int64_t(c.heads) * dvv);
  d.lse = lse_cols(f.lse, c.heads, q.shape[0], used_q());
  if (with_backward) {
    const auto g = ref::backward(dout, q, k, v, opt, &layout);
    d.dq = head_rows(g.dq, used_q(), int64_t(c.heads) * c.d);
    d.dk = head_rows(g.dk, used_k(), int64_t(c.heads_k) * c.d);
    d.dv = head_rows(g.dv, used_k(), int64_t(c.heads_k) * dvv);
  }
  return d;
}

::testing::AssertionResult VarlenProblem::per_sequence(Dense& r, bool standard, bool with_backward) const {
  const int dvv = c.head_dim_v(), H = c.heads, HK = c.heads_k;
  r.out.assign(size_t(used_q() * H * dvv), 0.0);
  r.lse.assign(size_t(H * used_q()), -kInf);
  if (with_backward) {
    r.dq.assign(size_t(used_q() * H * c.d), 0.0);
    r.dk.assign(size_t(used_k() * HK * c.d), 0.0);
    r.dv.assign(size_t(used_k() * HK * dvv), 0.0);
  }
  // (1, len, heads, dim) view of the rows [begin, begin + len) of a (rows, heads, dim) view
  auto seq = [](const Tensor& t, int64_t begin, int64_t len) {
    Tensor s = rows(t, begin, len);
    Tensor f = s;
    f.rank = 4;
    f.shape = {1, len, s.shape[1], s.shape[2], 0, 0};
    f.stride = {std::max<int64_t>(len, 1) * s.stride[0], s.stride[0], s.stride[1], 1, 0, 0};
    return f;
  };
  for (int b = 0; b < batch(); ++b) {
    const int64_t lq = c.lens_q[b], lk = c.lens_k[b];
    if (lq == 0) continue;  // nothing to compute; dK/dV of its keys stay 0
    if (lk == 0) continue;  // no key: O = 0, LSE = -inf, dQ = 0 (already so)
    Options o = opt;
    Buffer slope;
    if (c.alibi == Alibi::batch_heads) {
      slope = Buffer(DType::f32, H);
      const Tensor all = *opt.alibi_slopes;
      Tensor s = view(slope, {H});
      for (int h = 0; h < H; ++h) store(s, h, load(all, b * all.stride[0] + h));
      o.alibi_slopes = s;
    }
    const Tensor qs = seq(q, cu_q[b], lq), ks = seq(k, cu_k[b], lk), vs = seq(v, cu_k[b], lk),
                 dos = seq(dout, cu_q[b], lq);
    Buffer ob(c.dtype, lq * H * dvv), lb(DType::f32, H * lq);
    const Tensor os = view(ob, {1, lq, H, dvv}), ls = view(lb, {1, H, lq});
    auto res = runs(standard ? "standard::forward" : "flashattn::forward (one sequence)", [&] {
      if (standard)
        flashattn::standard::forward(qs, ks, vs, os, ls, o);
      else
        flashattn::forward(qs, ks, vs, os, ls, o);
    });
    if (!res) return res << " (sequence " << b << ")";
    const auto od = to_dense(os), ld = to_dense(ls);
    for (int64_t i = 0; i < lq; ++i)
      for (int h = 0; h < H; ++h) {
        r.lse[size_t(h * used_q() + cu_q[b] + i)] = ld[size_t(h * lq + i)];
        for (int x = 0; x < dvv; ++x)
          r.out[size_t(((cu_q[b] + i) * H + h) * dvv + x)] = od[size_t((i * H + h) * dvv + x)];
      }
    if (!with_backward) continue;
    Buffer gq(c.dtype, lq * H * c.d), gk(c.dtype, lk * HK * c.d), gv(c.dtype, lk * HK * dvv);
    const Tensor tq = view(gq, {1, lq, H, c.d}), tk = view(gk, {1, lk, HK, c.d}), tv = view(gv, {1, lk, HK, dvv});
    res = runs(standard ? "standard::backward" : "flashattn::backward (one sequence)", [&] {
      if (standard)
        flashattn::standard::backward(dos, qs, ks, vs, os, ls, tq, tk, tv, o);
      else
        flashattn::backward(dos, qs, ks, vs, os, ls, tq, tk, tv, o);
    });
    if (!res) return res << " (sequence " << b << ")";
    const auto dqd = to_dense(tq), dkd = to_dense(tk), dvd = to_dense(tv);
    std::copy(dqd.begin(), dqd.end(), r.dq.begin() + cu_q[b] * H * c.d);
    std::copy(dkd.begin(), dkd.end(), r.dk.begin() + cu_k[b] * HK * c.d);
    std::copy(dvd.begin(), dvd.end(), r.dv.begin() + cu_k[b] * HK * dvv);
  }
  return ::testing::AssertionSuccess();
}

// ---- finite differences ----------------------------------------------------------------------

std::vector<double> fd_gradient(const Tensor& x, const std::vector<double>& g,
                                const std::function<std::vector<double>()>& forward_out, double h) {
  if (x.dtype != DType::f32) throw std::logic_error("fd_gradient needs fp32 inputs");
  auto loss = [&] {
    const std::vector<double> o = forward_out();
    double l = 0;
    for (size_t i = 0; i < o.size() && i < g.size(); ++i) l += o[i] * g[i];
    return l;
  };
  std::vector<double> grad;
  for_each_offset(x, [&](int64_t off) {
    float* p = static_cast<float*>(x.data) + off;
    const float x0 = *p;
    const float xp = float(double(x0) + h), xm = float(double(x0) - h);
    *p = xp;
    const double lp = loss();
    *p = xm;
    const double lm = loss();
    *p = x0;
    grad.push_back((lp - lm) / (double(xp) - double(xm)));
  });
  return grad;
}

}  // namespace fa_test
