// Independent FMA chains, enough of them to cover the FMA latency on every port (12 x 4-cycle
// latency covers 2 ports x 4 cycles with room to spare), so the rate is throughput-bound.
// Each ISA's probe is compiled for that ISA alone and picked at run time.
#include "fma_peak.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace flashattn::bench {
namespace {

constexpr int kChains = 12;
constexpr int64_t kItersPerCheck = 1 << 14;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Returns the FMAs per lane done; stops after `seconds`. The result of the chains is kept alive
// through `sink` so the compiler cannot drop them.
__attribute__((target("avx512f"))) int64_t run_avx512(double seconds, float* sink) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + c * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
  const double end = now_s() + seconds;
  int64_t iters = 0;
  do {
    for (int64_t i = 0; i < kItersPerCheck; ++i)
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    iters += kItersPerCheck;
  } while (now_s() < end);
  __m512 total = acc[0];
  for (int c = 1; c < kChains; ++c) total = _mm512_add_ps(total, acc[c]);
  float lanes[16];
  _mm512_storeu_ps(lanes, total);
  *sink = lanes[0] + lanes[15];
  return iters * kChains * 16;
}

__attribute__((target("avx2,fma"))) int64_t run_avx2(double seconds, float* sink) {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(1.0f + c * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-6f);
  const double end = now_s() + seconds;
  int64_t iters = 0;
  do {
    for (int64_t i = 0; i < kItersPerCheck; ++i)
      for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    iters += kItersPerCheck;
  } while (now_s() < end);
  __m256 total = acc[0];
  for (int c = 1; c < kChains; ++c) total = _mm256_add_ps(total, acc[c]);
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  *sink = lanes[0] + lanes[7];
  return iters * kChains * 8;
}

}  // namespace

FmaPeak measure_fma_peak(int threads, double seconds) {
  FmaPeak peak;
  peak.threads = threads > 0 ? threads : omp_get_max_threads();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx512 && !avx2) return peak;
  peak.isa = avx512 ? "avx512" : "avx2";

  // The best of a few short rounds: a round that shares a core with another process reads low.
  constexpr int kRounds = 3;
  for (int round = 0; round < kRounds; ++round) {
    int64_t fmas = 0;
    volatile float keep = 0;
    const double start = now_s();
#pragma omp parallel num_threads(peak.threads) reduction(+ : fmas)
    {
      float sink = 0;
      fmas += avx512 ? run_avx512(seconds / kRounds, &sink) : run_avx2(seconds / kRounds, &sink);
      keep = sink;
    }
    const double elapsed = now_s() - start;
    (void)keep;
    peak.gflops = std::max(peak.gflops, 2.0 * double(fmas) / elapsed * 1e-9);
  }
  return peak;
}

}  // namespace flashattn::bench
