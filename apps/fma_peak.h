// Measures this machine's fp32 FMA peak: the ceiling flashattn-bench reports CPU rates against.
#pragma once

namespace flashattn::bench {

struct FmaPeak {
  double gflops = 0;        // all threads together
  int threads = 0;
  const char* isa = "none"; // "avx512", "avx2" or "none" (no probe for this CPU)
};

// Runs independent FMA chains on `threads` OpenMP threads for about `seconds`.
FmaPeak measure_fma_peak(int threads, double seconds = 0.2);

}  // namespace flashattn::bench
