// Calls the CUDA backend must refuse before anything runs, with a flashattn::Error naming the
// argument: what every CUDA family requires (head dims a multiple of 8, 16-byte aligned rows,
// fp16/bf16) and what the backward requires of its gradients (device, shape, alignment)
// (CudaErrors, CudaBackwardErrors). Without a usable sm80+ GPU every test is skipped (CI).
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "flashattn/flashattn.h"

namespace fa_test {
namespace {

// ---- the forward -------------------------------------------------------------------------------------
TEST(CudaErrors, HeadDimNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 2 * 4 * 36), o(2, 2 * 4 * 36), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor tq = Tensor::contiguous(q.data(), DType::bf16, {1, 2, 2, 36}, dev);
  Tensor to = Tensor::contiguous(o.data(), DType::bf16, {1, 2, 2, 36}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 2, 2}, dev);
  try {
    flashattn::forward(tq, tq, tq, to, tl);
    FAIL() << "expected flashattn::Error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "q") << e.what();
    EXPECT_NE(std::string(e.what()).find("multiple of 8"), std::string::npos) << e.what();
  }
}

TEST(CudaErrors, MisalignedRows) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer q(2, 4 * 64 + 8), o(2, 4 * 64), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor tq = Tensor::contiguous(static_cast<uint16_t*>(q.data()) + 1, DType::bf16, {1, 4, 1, 64}, dev);
  Tensor tk = Tensor::contiguous(q.data(), DType::bf16, {1, 4, 1, 64}, dev);
  Tensor to = Tensor::contiguous(o.data(), DType::bf16, {1, 4, 1, 64}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  try {
    flashattn::forward(tq, tk, tk, to, tl);
    FAIL() << "expected flashattn::Error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "q") << e.what();
  }
}

// ---- the backward ------------------------------------------------------------------------------------
// Valid device tensors for a (1, 16, 2, 64) bf16 problem; each test breaks one thing.
struct BadInputFixture {
  DeviceBuffer q{2, 2 * 16 * 2 * 64 + 64}, k{2, 16 * 2 * 64}, v{2, 16 * 2 * 64}, o{2, 16 * 2 * 64},
      d_o{2, 16 * 2 * 64}, l{4, 2 * 16}, dq{2, 2 * 16 * 2 * 64 + 64}, dk{2, 16 * 2 * 64}, dv{2, 16 * 2 * 64};
  Device dev = Device::cuda(0);
  Tensor t(const DeviceBuffer& b, int64_t offset = 0, int64_t row_stride = 128) const {
    return Tensor::strided(static_cast<uint16_t*>(b.data()) + offset, DType::bf16, {1, 16, 2, 64},
                           {16 * row_stride, row_stride, 64, 1}, dev);
  }
  Tensor lse() const { return Tensor::contiguous(l.data(), DType::f32, {1, 2, 16}, dev); }
};

// Runs fn and expects a flashattn::Error naming `argument`.
void expect_error(const char* argument, const std::function<void()>& fn) {
  try {
    fn();
    ADD_FAILURE() << "expected flashattn::Error for '" << argument << "'";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected flashattn::Error for '" << argument << "', got: " << e.what();
  }
}

TEST(CudaBackwardErrors, MisalignedGradientPointer) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  expect_error("dq", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq, 1), f.t(f.dk),
                        f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, DoutRowStrideNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  expect_error("dout", [&] {
    flashattn::backward(f.t(f.q, 0, 132), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), f.t(f.dk),
                        f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, HeadDimNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  // Separate buffers: outputs that alias inputs would be refused first, naming another argument.
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  const Device dev = Device::cuda(0);
  auto make = [&] {
    bufs.push_back(std::make_unique<DeviceBuffer>(2, 4 * 36));
    return Tensor::contiguous(bufs.back()->data(), DType::bf16, {1, 4, 1, 36}, dev);
  };
  const Tensor dout = make(), q = make(), k = make(), v = make(), out = make(), dq = make(), dk = make(), dv = make();
  DeviceBuffer l(4, 4);
  const Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  expect_error("q", [&] { flashattn::backward(dout, q, k, v, out, tl, dq, dk, dv); });
}

TEST(CudaBackwardErrors, GradientOnTheHost) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  std::vector<uint16_t> host(16 * 2 * 64);
  const Tensor dk_host = Tensor::contiguous(host.data(), DType::bf16, {1, 16, 2, 64});
  expect_error("dk", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), dk_host, f.t(f.dv));
  });
}

TEST(CudaBackwardErrors, GradientOfTheWrongShape) {
  SKIP_WITHOUT_GPU();
  BadInputFixture f;
  const Tensor dv_bad = Tensor::contiguous(f.dv.data(), DType::bf16, {1, 16, 2, 32}, f.dev);
  expect_error("dv", [&] {
    flashattn::backward(f.t(f.d_o), f.t(f.q), f.t(f.k), f.t(f.v), f.t(f.o), f.lse(), f.t(f.dq), f.t(f.dk), dv_bad);
  });
}

TEST(CudaBackwardErrors, Fp32IsCpuOnly) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer b(4, 4 * 64), l(4, 4);
  const Device dev = Device::cuda(0);
  Tensor x = Tensor::contiguous(b.data(), DType::f32, {1, 4, 1, 64}, dev);
  Tensor tl = Tensor::contiguous(l.data(), DType::f32, {1, 1, 4}, dev);
  expect_error("q", [&] { flashattn::backward(x, x, x, x, x, tl, x, x, x); });
}

}  // namespace
}  // namespace fa_test
