// Which kernel the dispatch picks (nothing is checked numerically here): the forward's sm90 / sm80 /
// decode choice and the knobs that steer it (CudaDispatch), the backward's sm90 / sm80 choice
// (CudaBackwardDispatch). The sm90 expectations hold on an sm_90 GPU with a build that has the 90a
// kernels (expect_sm90); elsewhere those tests skip. Without a usable sm80+ GPU every test is
// skipped (CI).
#include <gtest/gtest.h>

#include <string>

#include "backward_problem.h"
#include "common/gpu_testing.h"
#include "core/knobs.h"
#include "core/validate.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"

namespace fa_test {
namespace {

using flashattn::KernelChoice;
using flashattn::Knobs;

// ---- the forward ------------------------------------------------------------------------------------
// Params of a small problem on the GPU (buffers only; nothing runs).
struct DispatchProblem {
  DeviceBuffer q, k, v, o, l;
  Tensor tq, tk, tv, to, tl;
  DispatchProblem(int d, DType t, int heads, int heads_k)
      : q(2, 2 * 100 * heads * d), k(2, 2 * 100 * heads_k * d), v(2, 2 * 100 * heads_k * d),
        o(2, 2 * 100 * heads * d), l(4, 2 * heads * 100) {
    const Device dev = Device::cuda(0);
    tq = Tensor::contiguous(q.data(), t, {2, 100, heads, d}, dev);
    tk = Tensor::contiguous(k.data(), t, {2, 100, heads_k, d}, dev);
    tv = Tensor::contiguous(v.data(), t, {2, 100, heads_k, d}, dev);
    to = Tensor::contiguous(o.data(), t, {2, 100, heads, d}, dev);
    tl = Tensor::contiguous(l.data(), DType::f32, {2, heads, 100}, dev);
  }
  std::string kernel(const Options& opt) const {
    return flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, to, tl, opt, nullptr));
  }
};

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

TEST(CudaDispatch, Sm90RunsEveryCoveredCaseOnHopper) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  ScopedKnobs automatic([](Knobs& k) { k.cuda_forward = KernelChoice::kAuto; });  // also when the run forces sm80
  for (int d : {32, 64, 96, 128})
    for (DType t : {DType::bf16, DType::f16})
      for (bool causal : {false, true}) {
        DispatchProblem prob(d, t, 4, 2);
        Options opt;
        opt.causal = causal;
        const std::string k = prob.kernel(opt);
        EXPECT_TRUE(starts_with(k, "flash_fwd_sm90")) << "d " << d << (causal ? " causal" : "") << ": " << k;
        ScopedKnobs force([](Knobs& k) { k.cuda_forward = KernelChoice::kSm80; });
        const std::string k80 = prob.kernel(opt);
        EXPECT_TRUE(starts_with(k80, "flash_fwd_sm80")) << "FLASHATTN_CUDA_FORWARD=sm80 must pick sm80: " << k80;
      }
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options window;
  window.window_left = 16;
  window.window_right = 3;
  EXPECT_TRUE(starts_with(prob.kernel(window), "flash_fwd_sm90")) << prob.kernel(window);
  // Softcap and ALiBi take the kScoreMod kernel, wide and narrow (d64 causal) tiles, every head dim.
  DeviceBuffer slopes(4, 4);
  for (int d : {64, 128, 256})
    for (bool causal : {false, true}) {
      DispatchProblem mod_prob(d, DType::bf16, 4, 4);
      Options softcap, alibi;
      softcap.softcap = 30.0f;
      alibi.alibi_slopes = Tensor::contiguous(slopes.data(), DType::f32, {4}, Device::cuda(0));
      softcap.causal = alibi.causal = causal;
      for (const Options& o : {softcap, alibi}) {
        const std::string k = mod_prob.kernel(o);
        EXPECT_TRUE(starts_with(k, "flash_fwd_sm90") && k.find("softcap/alibi") != std::string::npos)
            << "d " << d << (causal ? " causal" : "") << ": " << k;
      }
      EXPECT_EQ(mod_prob.kernel(Options{}).find("softcap/alibi"), std::string::npos) << mod_prob.kernel(Options{});
    }
}

// d64 under a causal mask with a short query sequence takes the narrow 128-row tile, unmasked calls
// the 192-row one; FLASHATTN_SM90_NARROW forces either.
TEST(CudaDispatch, Sm90D64CausalShortTakesTheNarrowTile) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  ScopedKnobs automatic([](Knobs& k) {
    k.cuda_forward = KernelChoice::kAuto;
    k.sm90_narrow = flashattn::Override::kAuto;
  });
  DispatchProblem prob(64, DType::bf16, 4, 2);
  Options causal;
  causal.causal = true;
  EXPECT_NE(prob.kernel(causal).find("128x128, 2+1 warpgroups"), std::string::npos) << prob.kernel(causal);
  EXPECT_NE(prob.kernel(Options{}).find("192x128, 3+1 warpgroups"), std::string::npos) << prob.kernel(Options{});
  ScopedKnobs wide([](Knobs& k) { k.sm90_narrow = flashattn::Override::kOff; });
  EXPECT_NE(prob.kernel(causal).find("192x128, 3+1 warpgroups"), std::string::npos) << prob.kernel(causal);
}

// Decoding (a few query rows per kv head) takes the split-KV decode kernel, on Hopper too.
TEST(CudaDispatch, DecodeShapesTakeTheDecodeKernel) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 2 * 32 * 128), o(2, 2 * 32 * 128), l(4, 2 * 32), k(2, 2 * 4096 * 8 * 128), v(2, 2 * 4096 * 8 * 128);
  const Device dev = Device::cuda(0);
  const Tensor tq = Tensor::contiguous(q.data(), DType::bf16, {2, 1, 32, 128}, dev);
  const Tensor to = Tensor::contiguous(o.data(), DType::bf16, {2, 1, 32, 128}, dev);
  const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {2, 32, 1}, dev);
  const Tensor tk = Tensor::contiguous(k.data(), DType::bf16, {2, 4096, 8, 128}, dev);
  const Tensor tv = Tensor::contiguous(v.data(), DType::bf16, {2, 4096, 8, 128}, dev);
  const std::string kernel =
      flashattn::cuda::forward_kernel(flashattn::core::check_forward(tq, tk, tv, to, tl, Options{}, nullptr));
  EXPECT_TRUE(starts_with(kernel, "decode_sm80")) << kernel;
}

TEST(CudaDispatch, UncoveredCallsFallBackToSm80) {
  SKIP_WITHOUT_GPU();
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options negative;
  negative.softmax_scale = -0.1f;
  EXPECT_TRUE(starts_with(prob.kernel(negative), "flash_fwd_sm80")) << prob.kernel(negative);
}

TEST(CudaDispatch, ForcedSm90SaysWhyItCannotRun) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  DispatchProblem prob(64, DType::bf16, 4, 4);
  Options negative;
  negative.softmax_scale = -0.1f;
  ScopedKnobs force([](Knobs& k) { k.cuda_forward = KernelChoice::kSm90; });
  try {
    prob.kernel(negative);
    FAIL() << "expected flashattn::Unsupported";
  } catch (const flashattn::Unsupported& e) {
    EXPECT_NE(std::string(e.what()).find("softmax scale"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace bwd {
namespace {

// ---- the backward -----------------------------------------------------------------------------------
// On an H100 (builds with the 90a arch and head dims 64, 128) the sm90 backward takes the
// fixed-length calls with head dims up to 128; the rest, and every call under
// FLASHATTN_CUDA_BACKWARD=sm80, run on the sm80 kernel.
TEST(CudaBackwardDispatch, Sm90TakesCoveredCallsOnHopper) {
  SKIP_WITHOUT_GPU();
  if (!expect_sm90()) GTEST_SKIP() << "not an sm_90 GPU, or a build without the 90a arch";
  auto kernel_of = [](const Case& c, flashattn::KernelChoice force) {
    BwdProblem prob(c);
    EXPECT_TRUE(prob.setup());
    ScopedKnobs knobs([force](flashattn::Knobs& k) { k.cuda_backward = force; });
    EXPECT_TRUE(prob.backward(c.deterministic));
    return prob.kernel;
  };
  Case c;
  c.sq = 130;
  c.sk = 200;
  c.heads = 4;
  c.heads_k = 2;
  for (int d : {32, 64, 96, 128})
    for (bool causal : {false, true}) {
      c.d = d;
      c.causal = causal;
      c.dtype = causal ? DType::f16 : DType::bf16;
      const std::string k = kernel_of(c, flashattn::KernelChoice::kAuto);
      EXPECT_TRUE(starts_with(k, "flash_bwd_sm90")) << "d " << d << (causal ? " causal" : "") << ": " << k;
      const std::string k80 = kernel_of(c, flashattn::KernelChoice::kSm80);
      EXPECT_TRUE(starts_with(k80, "flash_bwd_sm80")) << "FLASHATTN_CUDA_BACKWARD=sm80 must pick sm80: " << k80;
    }
  // The deterministic mode and softcap / ALiBi run on sm90 too; head dims above 128 do not (yet).
  c.d = 64;
  c.causal = false;
  Case det = c, softcap = c, alibi = c, wide = c;
  det.deterministic = true;
  softcap.softcap = 10.0f;
  alibi.alibi = Slopes::heads;
  wide.d = 192;
  for (const Case& u : {det, softcap, alibi})
    EXPECT_TRUE(starts_with(kernel_of(u, flashattn::KernelChoice::kAuto), "flash_bwd_sm90")) << kernel_of(u, flashattn::KernelChoice::kAuto);
  EXPECT_TRUE(starts_with(kernel_of(wide, flashattn::KernelChoice::kAuto), "flash_bwd_sm80")) << kernel_of(wide, flashattn::KernelChoice::kAuto);
}

}  // namespace
}  // namespace bwd
}  // namespace fa_test
