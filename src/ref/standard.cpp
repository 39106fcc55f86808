// Standard attention, the way PyTorch eager runs it: every stage is one pass over the whole
// problem and its result is materialised for all (batch, head) pairs before the next starts.
//
//   forward:  S = scale Q K^T (sgemm per head)  ->  P = softmax(mod(S) + mask) in place  ->  O = P V
//   backward: dP = dO V^T, S = scale Q K^T (recomputed)  ->  P and dS = P (dP - D) in place
//             ->  dV = P^T dO, dQ = scale dS K, dK = scale dS^T Q
//
// S/P and dP/dS are fp32 (batch, heads, seqlen_q, seqlen_k) buffers. For fp16/bf16 inputs every
// materialised tensor (S, P, O, dP, dS, gradients) is rounded through the input dtype, as
// eager PyTorch stores them: that makes this the same-precision baseline of docs/DESIGN.md §5.
//
// Threads: the per-head products run as single-threaded sgemms spread over OpenMP threads when
// the heads balance over the threads (as ATen's bmm does for many small matrices), else one
// after the other on multi-threaded BLAS. Mixing the two pools costs: OpenBLAS's idle workers
// spin for a while after every call and halve the speed of the OpenMP softmax that follows.
#include "ref/standard.h"

#include <cblas.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "core/half.h"
#include "core/validate.h"

namespace flashattn::standard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- buffers ------------------------------------------------------------------------------

// Uninitialised, like torch.empty: the first pass that writes a buffer also faults its pages in.
// Buffers of 2 MiB and more are 2 MiB aligned and ask for transparent huge pages, which cuts
// the page faults on the GiB-sized S/P from one per 4 KiB to one per 2 MiB.
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

FloatBuffer alloc_floats(int64_t n) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = std::max<size_t>(size_t(n), 1) * sizeof(float);
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  const size_t rounded = (bytes + align - 1) / align * align;
  auto* data = static_cast<float*>(std::aligned_alloc(align, rounded));
  if (!data) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHugePage) madvise(data, rounded, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
  return FloatBuffer(data);
}

// A (batch, rows, heads, cols) tensor seen as one row-major fp32 matrix per (batch, head).
// fp32 tensors whose row stride BLAS accepts are used in place; anything else (fp16, bf16)
// goes through a dense fp32 copy laid out [batch][heads][rows][cols].
class HeadMatrices {
 public:
  HeadMatrices(const void* data, DType dtype, Strides strides, int batch, int64_t rows, int heads,
               int cols)
      : data_(const_cast<void*>(data)), dtype_(dtype), strides_(strides), batch_(batch), rows_(rows),
        heads_(heads), cols_(cols) {
    if (usable_in_place(dtype, strides, rows, cols)) {
      ld_ = rows <= 1 ? cols : strides.row;
    } else {
      copy_ = alloc_floats(elements());
      ld_ = cols;
    }
  }

  static bool usable_in_place(DType dtype, Strides strides, int64_t rows, int cols) {
    return dtype == DType::f32 && (rows <= 1 || strides.row >= cols);
  }
  static int64_t copy_bytes(DType dtype, Strides strides, int batch, int64_t rows, int heads,
                            int cols) {
    if (usable_in_place(dtype, strides, rows, cols)) return 0;
    return int64_t(batch) * heads * rows * cols * int64_t(sizeof(float));
  }

  float* at(int b, int h) const {
    if (copy_) return copy_.get() + ((int64_t(b) * heads_ + h) * rows_) * cols_;
    return static_cast<float*>(data_) + b * strides_.batch + h * strides_.head;
  }
  int64_t ld() const { return ld_; }

  // Inputs: fill the fp32 copy from the tensor (no-op in place).
  void load(int num_threads) {
    if (!copy_) return;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int b = 0; b < batch_; ++b)
      for (int h = 0; h < heads_; ++h)
        for (int64_t r = 0; r < rows_; ++r) {
          float* dst = at(b, h) + r * cols_;
          const int64_t src = b * strides_.batch + r * strides_.row + h * strides_.head;
          for (int c = 0; c < cols_; ++c) dst[c] = load_as_float(data_, src + c, dtype_);
        }
  }
  // Outputs: write the fp32 copy back into the tensor, rounding to its dtype (no-op in place).
  void store(int num_threads) const {
    if (!copy_) return;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int b = 0; b < batch_; ++b)
      for (int h = 0; h < heads_; ++h)
        for (int64_t r = 0; r < rows_; ++r) {
          const float* src = at(b, h) + r * cols_;
          const int64_t dst = b * strides_.batch + r * strides_.row + h * strides_.head;
          for (int c = 0; c < cols_; ++c) store_from_float(data_, dst + c, dtype_, src[c]);
        }
  }

 private:
  int64_t elements() const { return int64_t(batch_) * heads_ * rows_ * cols_; }

  void* data_;
  DType dtype_;
  Strides strides_;
  int batch_;
  int64_t rows_;
  int heads_, cols_;
  int64_t ld_ = 0;
  FloatBuffer copy_;
};

Strides dense_strides(int64_t rows, int heads, int cols) {
  return Strides{rows * heads * cols, int64_t(heads) * cols, cols};
}

// ---- BLAS ---------------------------------------------------------------------------------

// C (m x n) = alpha op(A) op(B) + beta C, row-major. Empty shapes are handled here because BLAS
// implementations disagree on whether k = 0 still applies beta.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c,
              blasint(ldc));
}

// Runs independent per-head products on `threads` threads and restores OpenBLAS's own thread
// count afterwards (options.num_threads = 0 leaves it as it was).
class GemmThreads {
 public:
  explicit GemmThreads(int threads) : threads_(threads), saved_(openblas_get_num_threads()) {}
  ~GemmThreads() { openblas_set_num_threads(saved_); }
  GemmThreads(const GemmThreads&) = delete;
  GemmThreads& operator=(const GemmThreads&) = delete;

  // fn(task) for every task in [0, tasks): one task per OpenMP thread with single-threaded
  // BLAS when the tasks balance over the threads, else in order with multi-threaded BLAS.
  template <typename Fn>
  void run(int64_t tasks, Fn fn) const {
    const bool per_task = tasks >= 4 * threads_ || tasks % threads_ == 0;
    openblas_set_num_threads(per_task ? 1 : threads_);
    if (per_task) {
#pragma omp parallel for num_threads(threads_) schedule(static)
      for (int64_t t = 0; t < tasks; ++t) fn(t);
    } else {
      for (int64_t t = 0; t < tasks; ++t) fn(t);
    }
  }

 private:
  int threads_;
  int saved_;
};

// ---- row kernels (vectorised for the best ISA at load time) ---------------------------------

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_ROW_KERNEL __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FA_ROW_KERNEL
#endif

// exp(x) for the softmax's x <= 0: Cephes' expf polynomial on x = n ln2 + r, |r| <= ln2/2
// (about 1 ulp); arguments below -87 (including -inf) give exactly 0. Branch-free so the
// loops around it vectorise.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;            // ln2 in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.0f : y * two_n;
}

FA_ROW_KERNEL float row_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;  // std::max does not vectorise
  return m;
}

// x <- exp(x - max); returns the sum.
FA_ROW_KERNEL float exp_and_sum(float* x, int64_t n, float max) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - max);
    sum += x[j];
  }
  return sum;
}

FA_ROW_KERNEL void scale_row(float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

// Rounding through bf16 (nearest even, NaN kept), as float_to_bf16 does, branch-free so it
// vectorises.
FA_ROW_KERNEL void round_row_bf16(float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = std::bit_cast<uint32_t>(x[j]);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const uint32_t nan = (bits | 0x00400000u) & 0xffff0000u;
    x[j] = std::bit_cast<float>((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
}

// Rounding through fp16 with the F16C / AVX-512 conversion instructions (IEEE nearest even,
// like float_to_f16); the scalar conversion where the CPU has neither.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void round_row_f16_avx512(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    // The maskz forms: identical code, without GCC 12's false "uninitialised" warning on the plain ones.
    const __m256i h = _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_storeu_ps(x + j, _mm512_maskz_cvtph_ps(0xffff, h));
  }
  for (; j < n; ++j) x[j] = round_to(DType::f16, x[j]);
}

__attribute__((target("avx,f16c"))) void round_row_f16_f16c(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(x + j, _mm256_cvtph_ps(h));
  }
  for (; j < n; ++j) x[j] = round_to(DType::f16, x[j]);
}

#endif

void round_row_f16(float* x, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("f16c") ? 1 : 0;
  if (isa == 2) return round_row_f16_avx512(x, n);
  if (isa == 1) return round_row_f16_f16c(x, n);
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = round_to(DType::f16, x[j]);
}

// x <- x stored in `dtype` and read back (what eager PyTorch's fp16/bf16 tensors hold).
void round_row(float* x, int64_t n, DType dtype) {
  if (dtype == DType::bf16) round_row_bf16(x, n);
  if (dtype == DType::f16) round_row_f16(x, n);
}

// ---- softmax --------------------------------------------------------------------------------

// One row of S (already scaled and rounded) becomes P in place: score mod on the visible keys,
// 0 on the masked ones. Returns the row's LSE; a row without visible keys is all zeros, -inf.
float softmax_row(float* row, int64_t i, const Mask& mask, const ScoreMod& mod, DType dtype) {
  const int64_t sk = mask.seqlen_k;
  const int64_t begin = mask.key_begin(i), end = mask.key_end(i);
  if (begin >= end) {
    std::fill(row, row + sk, 0.0f);
    return kNegInf;
  }
  std::fill(row, row + begin, 0.0f);
  std::fill(row + end, row + sk, 0.0f);
  float* visible = row + begin;
  const int64_t n = end - begin;
  if (mod.active())
    for (int64_t j = 0; j < n; ++j) visible[j] = mod.apply(visible[j], i, begin + j, mask);
  const float max = row_max(visible, n);
  const float sum = exp_and_sum(visible, n, max);
  scale_row(visible, n, 1.0f / sum);
  round_row(visible, n, dtype);
  return max + std::log(sum);
}

// ---- the problem ---------------------------------------------------------------------------

struct Problem {
  const AttnParams& p;
  int64_t score_elems() const { return int64_t(p.batch) * p.heads * p.seqlen_q * p.seqlen_k; }
  float* score_row(float* base, int b, int h, int64_t i) const {
    return base + ((int64_t(b) * p.heads + h) * p.seqlen_q + i) * p.seqlen_k;
  }
  int kv_head(int h) const { return h / p.group_size(); }
};

int threads_of(const AttnParams& p) { return p.num_threads > 0 ? p.num_threads : omp_get_max_threads(); }

void require_cpu(const AttnParams& p) {
  if (p.device.kind != DeviceKind::cpu)
    throw Error("q", "host memory (the standard attention runs on the CPU)", device_name(p.device));
}

// S = scale Q K^T for every (batch, head).
void scores(const Problem& pr, const GemmThreads& threads, const HeadMatrices& q, const HeadMatrices& k,
            float* s) {
  const AttnParams& p = pr.p;
  threads.run(int64_t(p.batch) * p.heads, [&](int64_t task) {
    const int b = int(task / p.heads), h = int(task % p.heads);
    gemm(false, true, p.seqlen_q, p.seqlen_k, p.head_dim, p.scale, q.at(b, h), q.ld(), k.at(b, pr.kv_head(h)),
         k.ld(), 0.0f, pr.score_row(s, b, h, 0), p.seqlen_k);
  });
}

}  // namespace

// ---- public entry points -----------------------------------------------------------------------

int64_t workspace_bytes(const Tensor& q, const Tensor& k, const Tensor& v, bool backward) {
  const AttnParams p = core::check_inputs(q, k, v, Options{}, nullptr);
  const int64_t f = sizeof(float);
  const int64_t scores = int64_t(p.batch) * p.heads * p.seqlen_q * p.seqlen_k * f;
  auto copy = [&](Strides s, int heads, int64_t rows, int cols) {
    return HeadMatrices::copy_bytes(p.dtype, s, p.batch, rows, heads, cols);
  };
  // Outputs and gradients are assumed dense, in the dtype of q.
  int64_t bytes = scores + copy(p.q_stride, p.heads, p.seqlen_q, p.head_dim) +
                  copy(p.k_stride, p.heads_k, p.seqlen_k, p.head_dim) +
                  copy(p.v_stride, p.heads_k, p.seqlen_k, p.head_dim_v);
  if (!backward) return bytes + copy(dense_strides(p.seqlen_q, p.heads, p.head_dim_v), p.heads,
                                     p.seqlen_q, p.head_dim_v);
  bytes += scores;                                                          // dP / dS
  bytes += copy(dense_strides(p.seqlen_q, p.heads, p.head_dim_v), p.heads, p.seqlen_q, p.head_dim_v);  // dO
  bytes += copy(dense_strides(p.seqlen_q, p.heads, p.head_dim), p.heads, p.seqlen_q, p.head_dim);      // dQ
  bytes += copy(dense_strides(p.seqlen_k, p.heads_k, p.head_dim), p.heads_k, p.seqlen_k, p.head_dim);  // dK
  bytes += copy(dense_strides(p.seqlen_k, p.heads_k, p.head_dim_v), p.heads_k, p.seqlen_k, p.head_dim_v);  // dV
  if (p.softcap > 0) bytes += int64_t(omp_get_max_threads()) * p.seqlen_k * f;  // tanh row per thread
  return bytes;
}

void forward(const Tensor& q_t, const Tensor& k_t, const Tensor& v_t, const Tensor& out_t,
             const Tensor& lse_t, const Options& options) {
  const AttnParams p = core::check_forward(q_t, k_t, v_t, out_t, lse_t, options, nullptr);
  require_cpu(p);
  if (p.seqused_k)  // the baseline materialises whole sequences
    throw Error("seqused_k", "unset for the standard attention (run it on the used keys' views)", "a tensor");
  const int threads = threads_of(p);
  const GemmThreads gemm_threads(threads);
  const Problem pr{p};

  HeadMatrices q(p.q, p.dtype, p.q_stride, p.batch, p.seqlen_q, p.heads, p.head_dim);
  HeadMatrices k(p.k, p.dtype, p.k_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim);
  HeadMatrices v(p.v, p.dtype, p.v_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim_v);
  HeadMatrices out(p.out, p.dtype, p.out_stride, p.batch, p.seqlen_q, p.heads, p.head_dim_v);
  q.load(threads);
  k.load(threads);
  v.load(threads);

  FloatBuffer s = alloc_floats(pr.score_elems());
  scores(pr, gemm_threads, q, k, s.get());

  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int b = int(r / (int64_t(p.heads) * p.seqlen_q));
    const int h = int(r / p.seqlen_q % p.heads);
    const int64_t i = r % p.seqlen_q;
    float* row = pr.score_row(s.get(), b, h, i);
    round_row(row, p.seqlen_k, p.dtype);  // S as the dtype's matmul would have stored it
    const float lse = softmax_row(row, i, p.mask(b), p.score_mod(b, h), p.dtype);
    if (p.lse) p.lse[p.lse_offset(b, i, h)] = lse;
  }

  gemm_threads.run(int64_t(p.batch) * p.heads, [&](int64_t task) {
    const int b = int(task / p.heads), h = int(task % p.heads);
    gemm(false, false, p.seqlen_q, p.head_dim_v, p.seqlen_k, 1.0f, pr.score_row(s.get(), b, h, 0), p.seqlen_k,
         v.at(b, pr.kv_head(h)), v.ld(), 0.0f, out.at(b, h), out.ld());
  });
  out.store(threads);
}

void backward(const Tensor& dout_t, const Tensor& q_t, const Tensor& k_t, const Tensor& v_t,
              const Tensor& out_t, const Tensor& lse_t, const Tensor& dq_t, const Tensor& dk_t,
              const Tensor& dv_t, const Options& options) {
  const BwdParams p =
      core::check_backward(dout_t, q_t, k_t, v_t, out_t, lse_t, dq_t, dk_t, dv_t, options, nullptr);
  require_cpu(p);
  const int threads = threads_of(p);
  const GemmThreads gemm_threads(threads);
  const Problem pr{p};

  HeadMatrices q(p.q, p.dtype, p.q_stride, p.batch, p.seqlen_q, p.heads, p.head_dim);
  HeadMatrices k(p.k, p.dtype, p.k_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim);
  HeadMatrices v(p.v, p.dtype, p.v_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim_v);
  HeadMatrices dout(p.dout, p.dtype, p.dout_stride, p.batch, p.seqlen_q, p.heads, p.head_dim_v);
  HeadMatrices dq(p.dq, p.dtype, p.dq_stride, p.batch, p.seqlen_q, p.heads, p.head_dim);
  HeadMatrices dk(p.dk, p.dtype, p.dk_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim);
  HeadMatrices dv(p.dv, p.dtype, p.dv_stride, p.batch, p.seqlen_k, p.heads_k, p.head_dim_v);
  q.load(threads);
  k.load(threads);
  v.load(threads);
  dout.load(threads);

  // dP = dO V^T, then S = scale Q K^T, both materialised for every head.
  FloatBuffer ds = alloc_floats(pr.score_elems());
  gemm_threads.run(int64_t(p.batch) * p.heads, [&](int64_t task) {
    const int b = int(task / p.heads), h = int(task % p.heads);
    gemm(false, true, p.seqlen_q, p.seqlen_k, p.head_dim_v, 1.0f, dout.at(b, h), dout.ld(), v.at(b, pr.kv_head(h)),
         v.ld(), 0.0f, pr.score_row(ds.get(), b, h, 0), p.seqlen_k);
  });
  FloatBuffer s = alloc_floats(pr.score_elems());
  scores(pr, gemm_threads, q, k, s.get());

  // Per row: P recomputed in place of S, dS = P (dP - D) in place of dP, D = rowsum(dO O).
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> dscore_row(p.softcap > 0 ? p.seqlen_k : 0);  // the softcap's derivative
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int b = int(r / (int64_t(p.heads) * p.seqlen_q));
      const int h = int(r / p.seqlen_q % p.heads);
      const int64_t i = r % p.seqlen_q;
      float D = 0.0f;
      for (int d = 0; d < p.head_dim_v; ++d)
        D += load_as_float(p.dout, p.dout_offset(b, i, h) + d, p.dtype) *
             load_as_float(p.out, p.out_offset(b, i, h) + d, p.dtype);

      float* prow = pr.score_row(s.get(), b, h, i);
      float* dsrow = pr.score_row(ds.get(), b, h, i);
      round_row(prow, p.seqlen_k, p.dtype);
      round_row(dsrow, p.seqlen_k, p.dtype);
      if (p.softcap > 0) {
        const ScoreMod softcap = ScoreMod::make(p.softcap, 0.0f);
        for (int64_t j = 0; j < p.seqlen_k; ++j) softcap.cap(prow[j], dscore_row[j]);
      }
      softmax_row(prow, i, p.mask(b), p.score_mod(b, h), p.dtype);
      for (int64_t j = 0; j < p.seqlen_k; ++j) {
        float g = prow[j] * (dsrow[j] - D);
        if (p.softcap > 0) g *= dscore_row[j];  // through the softcap
        dsrow[j] = g;
      }
      round_row(dsrow, p.seqlen_k, p.dtype);
    }
  }

  // dV = sum over the group of P^T dO, dK = scale sum of dS^T Q, dQ = scale dS K. One task per
  // kv head, so the group's sums into dK/dV stay in one thread.
  const int group = p.group_size();
  gemm_threads.run(int64_t(p.batch) * p.heads_k, [&](int64_t task) {
    const int b = int(task / p.heads_k), hk = int(task % p.heads_k);
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      const float beta = h == hk * group ? 0.0f : 1.0f;  // the group's first head overwrites
      const float* p_bh = pr.score_row(s.get(), b, h, 0);
      const float* ds_bh = pr.score_row(ds.get(), b, h, 0);
      gemm(true, false, p.seqlen_k, p.head_dim_v, p.seqlen_q, 1.0f, p_bh, p.seqlen_k, dout.at(b, h), dout.ld(),
           beta, dv.at(b, hk), dv.ld());
      gemm(true, false, p.seqlen_k, p.head_dim, p.seqlen_q, p.scale, ds_bh, p.seqlen_k, q.at(b, h), q.ld(), beta,
           dk.at(b, hk), dk.ld());
      gemm(false, false, p.seqlen_q, p.head_dim, p.seqlen_k, p.scale, ds_bh, p.seqlen_k, k.at(b, hk), k.ld(), 0.0f,
           dq.at(b, h), dq.ld());
    }
  });
  dq.store(threads);
  dk.store(threads);
  dv.store(threads);
}

}  // namespace flashattn::standard
