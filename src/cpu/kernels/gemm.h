// The register-blocked fp32 GEMM micro-kernel behind every block product of the CPU kernels:
//   C[m x n] (+)= A[m x k] * B[k x n]
// B and C are row-major with n contiguous; A is addressed through two strides, so the same
// kernel serves A = K (row-major) and A = P read from the transposed score block.
// n must be a multiple of kLanes (callers pad their buffers); m and k are arbitrary.
#pragma once

#include <cstdint>
#include <array>
#include <utility>

#include "cpu/kernels/simd.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {

struct StridedA {
  const float* data;
  int64_t row_stride;  // between rows of A (the m index)
  int64_t col_stride;  // between columns of A (the k index)
};

// Rows of A per micro-tile and vectors of B per micro-tile: MR * NV accumulators plus NV
// loaded B vectors must fit the register file (32 zmm, 16 ymm/xmm).
#if defined(FLASHATTN_CPU_ISA_avx512)
inline constexpr int kGemmMR = 6, kGemmNV = 4;  // 24 + 4 of 32 registers
#else
inline constexpr int kGemmMR = 6, kGemmNV = 2;  // 12 + 2 of 16 registers
#endif

template <int MR, int NV>
inline void gemm_tile(int k, StridedA a, const float* b, int64_t ldb, float* c, int64_t ldc,
                      bool accumulate) {
  vfloat acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : vfloat{};
  const float* a_col = a.data;
  for (int p = 0; p < k; ++p, a_col += a.col_stride, b += ldb) {
    vfloat bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vfloat av = splat(a_col[r * a.row_stride]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

using GemmTileFn = void (*)(int, StridedA, const float*, int64_t, float*, int64_t, bool);

template <int... Is>
constexpr auto make_gemm_table(std::integer_sequence<int, Is...>) {
  // Entry (mr - 1) * kGemmNV + (nv - 1) handles an mr x nv edge tile.
  return std::array<GemmTileFn, sizeof...(Is)>{&gemm_tile<Is / kGemmNV + 1, Is % kGemmNV + 1>...};
}
inline constexpr auto kGemmTiles = make_gemm_table(std::make_integer_sequence<int, kGemmMR * kGemmNV>{});

inline void gemm(int m, int n, int k, StridedA a, const float* b, int64_t ldb, float* c, int64_t ldc,
                 bool accumulate) {
  constexpr int kPanel = kGemmNV * kLanes;
  for (int j = 0; j < n; j += kPanel) {  // a panel of B stays in L1 while A streams past it
    const int nv = (n - j) >= kPanel ? kGemmNV : (n - j) / kLanes;
    for (int i = 0; i < m; i += kGemmMR) {
      const int mr = (m - i) >= kGemmMR ? kGemmMR : (m - i);
      const StridedA ai{a.data + i * a.row_stride, a.row_stride, a.col_stride};
      kGemmTiles[(mr - 1) * kGemmNV + (nv - 1)](k, ai, b + j, ldb, c + int64_t(i) * ldc + j, ldc, accumulate);
    }
  }
}

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
