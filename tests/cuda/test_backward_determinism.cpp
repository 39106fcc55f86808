// The backward's deterministic mode (CudaBackwardDeterministic): 20 runs on one stream must give
// the same gradient bytes, and agree with the atomic mode (dQ within the oracle rule, dK/dV bitwise:
// they never use atomics). The problem itself is backward_problem.h. Without a usable sm80+ GPU
// every test is skipped (CI).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "backward_problem.h"
#include "common/gpu_testing.h"

namespace fa_test::bwd {
namespace {

// ---- deterministic mode -------------------------------------------------------------------------
// 20 runs give the same bytes; dQ agrees with the atomic mode within the oracle rule (and each
// within its own bound). The problems have many key blocks per query block, so the atomic mode's
// adds do race.
std::vector<Case> determinism_cases() {
  std::vector<Case> v;
  Case c;
  c.batch = 2;
  c.sq = 1000;
  c.sk = 1013;
  c.heads = 4;
  c.heads_k = 2;
  c.d = 128;
  c.name = "d128_gqa";
  v.push_back(c);
  c.causal = true;
  c.d = 64;
  c.dtype = DType::f16;
  c.name = "d64_causal_fp16";
  v.push_back(c);
  Case w;
  w.lens_q = {300, 0, 1013, 77};
  w.lens_k = {1013, 40, 500, 77};
  w.batch = 4;
  w.heads = 4;
  w.heads_k = 1;
  w.d = 96;
  w.wl = 200;
  w.wr = 30;
  w.alibi = Slopes::heads;
  w.name = "varlen_window_alibi_d96";
  v.push_back(w);
  return v;
}

class CudaBackwardDeterministic : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackwardDeterministic, BitwiseOver20RunsAndAgreesWithAtomics) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  BwdProblem prob(c);
  ASSERT_TRUE(prob.setup());
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  ASSERT_TRUE(prob.backward(true, stream));
  const auto dq0 = prob.raw_dq, dk0 = prob.raw_dk, dv0 = prob.raw_dv;
  const auto dq_det = prob.dq;
  int differing = 0;
  for (int run = 1; run < 20; ++run) {
    ASSERT_TRUE(prob.backward(true, stream));
    differing += prob.raw_dq != dq0 || prob.raw_dk != dk0 || prob.raw_dv != dv0;
  }
  EXPECT_EQ(differing, 0) << "of 19 deterministic reruns differ from the first in some byte";
  const auto ref = prob.oracle();
  BwdProblem::Base base;
  ASSERT_TRUE(prob.baseline(base));
  EXPECT_TRUE(close("dQ (deterministic)", c.dtype, dq_det, &base.dq, ref.dq));
  ASSERT_TRUE(prob.backward(false, stream));
  EXPECT_TRUE(close("dQ (atomic)", c.dtype, prob.dq, &base.dq, ref.dq));
  EXPECT_TRUE(agree("dQ deterministic vs atomic", c.dtype, dq_det, prob.dq, &base.dq, ref.dq));
  // dK and dV never use atomics: the same bytes in both modes.
  EXPECT_TRUE(prob.raw_dk == dk0 && prob.raw_dv == dv0) << "dK/dV differ between the two modes";
  CUDA_OK(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaBackwardDeterministic, ::testing::ValuesIn(determinism_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

}  // namespace
}  // namespace fa_test::bwd
