// A small SIMD vocabulary over GCC/Clang vector extensions. The same source becomes 16-wide
// AVX-512, 8-wide AVX2 or 4-wide SSE2 code depending on the ISA the file is compiled for,
// which keeps the kernels free of intrinsics except where a conversion has no portable form.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "core/half.h"
#include "core/mask.h"
#include "cpu/kernels/isa.h"

#if defined(FLASHATTN_CPU_ISA_avx512) || defined(FLASHATTN_CPU_ISA_avx2)
#include <immintrin.h>
#endif

namespace flashattn::cpu::FLASHATTN_CPU_ISA {

#if defined(FLASHATTN_CPU_ISA_avx512)
inline constexpr int kLanes = 16;
#elif defined(FLASHATTN_CPU_ISA_avx2)
inline constexpr int kLanes = 8;
#else
inline constexpr int kLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
template <size_t... I>
inline vfloat splat_lanes(float x, std::index_sequence<I...>) {
  return vfloat{((void)I, x)...};
}
// Not `vfloat{} + x`: 0 + x is not x for x = -0, so the compiler would keep a scalar add.
inline vfloat splat(float x) { return splat_lanes(x, std::make_index_sequence<kLanes>{}); }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

inline float reduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
// Pairwise: the halves are added until two lanes are left, log2(kLanes) dependent adds rather
// than a kLanes-long chain of scalar adds (the decode paths reduce one vector per dot product).
template <int N>
struct VecOf {
  typedef float type __attribute__((vector_size(N * 4)));
};
template <int N, size_t... I>
inline float reduce_add_pairwise(typename VecOf<N>::type v, std::index_sequence<I...>) {
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
    const typename VecOf<N / 2>::type lo = __builtin_shufflevector(v, v, I...);
    const typename VecOf<N / 2>::type hi = __builtin_shufflevector(v, v, (I + N / 2)...);
    return reduce_add_pairwise<N / 2>(lo + hi, std::make_index_sequence<N / 4>{});
  }
}
inline float reduce_add(vfloat v) { return reduce_add_pairwise<kLanes>(v, std::make_index_sequence<kLanes / 2>{}); }

// 2^x to about 1 ulp: x = n + f with n = round(x), f in [-0.5, 0.5]; 2^f by its degree-7
// Taylor series in f*ln2 (truncation error < 2e-9), 2^n by building the exponent bits.
// x <= -127 (including -inf from masking) gives exactly 0, as softmax needs.
inline vfloat exp2(vfloat x) {
  const vint underflow = x < -126.5f;
  x = x < -126.5f ? splat(-126.5f) : x;
  x = x > 127.0f ? splat(127.0f) : x;
  const vfloat shifted = x + 0.5f;
  vint n = __builtin_convertvector(shifted, vint);  // truncates toward zero
  n += (__builtin_convertvector(n, vfloat) > shifted);  // -> floor(x + 0.5): comparisons are -1
  const vfloat f = (x - __builtin_convertvector(n, vfloat)) * 0.69314718055994531f;
  vfloat p = splat(1.0f / 5040);
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vint scale_bits = (n + 127) << 23;
  vfloat r = p * (vfloat)scale_bits;
  return underflow ? vfloat{} : r;
}

// tanh(x) = 1 - 2 / (e^{2x} + 1), with |x| clamped where tanh is +-1 in fp32.
inline vfloat tanh(vfloat x) {
  x = x > 9.0f ? splat(9.0f) : x;
  x = x < -9.0f ? splat(-9.0f) : x;
  const vfloat e = exp2(x * 2.8853900817779268f);  // 2 * log2(e)
  return 1.0f - 2.0f / (e + 1.0f);
}

// Software prefetch of one strided tensor row a few rows ahead: rows of a (batch, row, head,
// dim) tensor lie heads * dim elements apart, often a page or more, where the hardware
// prefetchers give up and a loop over rows would wait on every one.
inline void prefetch_row(const void* base, int64_t offset, DType t, int n) {
  const char* p = static_cast<const char*>(base) + dtype_size(t) * offset;
  for (int64_t byte = 0; byte < int64_t(n) * int64_t(dtype_size(t)); byte += 64) __builtin_prefetch(p + byte);
}
inline constexpr int kPrefetchRows = 4;

// ---- dtype conversion of a contiguous run of n elements to fp32 --------------------------
inline void bf16_to_float(const uint16_t* src, int n, float* dst) {
  int i = 0;
  typedef uint16_t vhalf __attribute__((vector_size(kLanes * 2)));
  for (; i + kLanes <= n; i += kLanes) {
    vhalf h;
    std::memcpy(&h, src + i, sizeof h);
    const vint bits = __builtin_convertvector(h, vint) << 16;
    store(dst + i, (vfloat)bits);
  }
  for (; i < n; ++i) dst[i] = flashattn::bf16_to_float(src[i]);
}

inline void f16_to_float(const uint16_t* src, int n, float* dst) {
  int i = 0;
#if defined(FLASHATTN_CPU_ISA_avx512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(FLASHATTN_CPU_ISA_avx2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = flashattn::f16_to_float(src[i]);
}

inline void to_float(const void* src, DType t, int n, float* dst) {
  switch (t) {
    case DType::f32: std::memcpy(dst, src, sizeof(float) * n); break;
    case DType::bf16: bf16_to_float(static_cast<const uint16_t*>(src), n, dst); break;
    case DType::f16: f16_to_float(static_cast<const uint16_t*>(src), n, dst); break;
    default: break;
  }
}

// dst[i] = src[i] * scale, converted to dtype t.
inline void from_float(const float* src, float scale, int n, DType t, void* dst) {
  switch (t) {
    case DType::f32: {
      float* d = static_cast<float*>(dst);
      int i = 0;
      for (; i + kLanes <= n; i += kLanes) store(d + i, load(src + i) * scale);
      for (; i < n; ++i) d[i] = src[i] * scale;
      break;
    }
    case DType::bf16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = flashattn::float_to_bf16(src[i] * scale);
      break;
    }
    case DType::f16: {
      auto* d = static_cast<uint16_t*>(dst);
      int i = 0;
#if defined(FLASHATTN_CPU_ISA_avx512)
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_set1_ps(scale)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; i < n; ++i) d[i] = flashattn::float_to_f16(src[i] * scale);
      break;
    }
    default: break;
  }
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA

// core/mask.h's ScoreMod on SIMD vectors: the vector tanh above, and a broadcast.
template <>
struct flashattn::ScoreMath<flashattn::cpu::FLASHATTN_CPU_ISA::vfloat> {
  using vfloat = cpu::FLASHATTN_CPU_ISA::vfloat;
  static vfloat tanh(vfloat x) { return cpu::FLASHATTN_CPU_ISA::tanh(x); }
  static vfloat splat(float x) { return cpu::FLASHATTN_CPU_ISA::splat(x); }
};
