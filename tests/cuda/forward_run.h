// The forward oracle check that the parameterised CudaForward suites run (the Grid instantiation in
// test_forward_grid.cpp, SplitKV in test_split_kv.cpp): one case = flashattn::forward /
// forward_varlen on device tensors, checked against the fp64 oracle (ref::forward) on host copies
// with the docs/DESIGN.md §5 rule
//   max|ours - ref| <= 2 * max|base - ref| + atol_rel * max|ref|
// where base = the standard attention (flashattn::standard, materialised S/P rounded to the
// input dtype) on the CPU, and atol_rel = 1e-2 (bf16) / 1e-3 (fp16): the rounding of the stored
// result alone, with a factor 2 (the same constants as the CPU suite's tests/common).
//
// Every output buffer is poisoned (NaN) with guard bands around it, and strided layouts leave
// gaps that must stay untouched; rows the oracle calls empty must be exactly O = 0, LSE = -inf.
//
// On an H100 the grid runs the sm90 kernel wherever it covers a case and the sm80 kernel
// elsewhere; FLASHATTN_CUDA_FORWARD=sm80 in the environment runs the whole grid on sm80 (the
// device script does both). The summary line printed at the end (main.cpp) counts the cases each
// kernel family ran and the largest errors against their bounds.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "core/knobs.h"

namespace fa_test::fwd {

// A forward case: the problem (GpuCase), ALiBi (one slope per head) and the forward's own settings.
struct Case : GpuCase {
  bool alibi = false;
  int num_splits = 0;           // options.num_splits: 0 = heuristic, 1 = never split, N = N key splits
  bool decode_kernel = true;    // false: FLASHATTN_CUDA_DECODE=0, decode shapes go to the main kernel
  flashattn::KernelChoice force = flashattn::KernelChoice::kAuto;  // FLASHATTN_CUDA_FORWARD for this case
  int sm90_ctas = 0;            // FLASHATTN_SM90_MAX_CTAS: a small persistent grid, many tiles per CTA
  std::vector<int32_t> used_k;  // options.seqused_k (keys used per sequence) when non-empty
};

inline std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// One case: fresh random inputs (seed_for(c.name)), our forward, the oracle and the baseline; the
// checks are gtest assertions inside run().
class ForwardRun {
 public:
  explicit ForwardRun(const Case& c) : c_(c) {}

  void run();

 private:
  Case c_;
  std::vector<uint16_t> hq_, hk_, hv_;
};

// The fixture of CudaForward.MatchesOracle: declared here so that test_forward_grid.cpp (the
// TEST_P and the Grid cases) and test_split_kv.cpp (the SplitKV cases) instantiate one suite.
class CudaForward : public ::testing::TestWithParam<Case> {};

// Prints the largest errors seen per dtype and the grid cases each kernel family ran, at the end
// of the program (nothing without a GPU). The caller owns it until gtest's listener list does.
::testing::TestEventListener* new_summary_printer();

}  // namespace fa_test::fwd
