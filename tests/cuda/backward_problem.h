// One backward problem of the CUDA backward suites (test_backward_grid.cpp, the determinism suite,
// CudaBackwardDispatch): flashattn::backward / backward_varlen on device tensors, after our CUDA
// forward on the same inputs, checked against the fp64 oracle (ref::backward) on host copies with
// the docs/DESIGN.md §5 rule for each of dQ, dK, dV (tests/common/testing.h, `close`):
//   max|ours - ref| <= 2 * max|base - ref| + atol_rel * max|ref|
// where base = the standard attention forward + backward in the input dtype (flashattn::standard,
// CPU), atol_rel = 1e-2 (bf16) / 1e-3 (fp16).
//
// Every gradient buffer is poisoned (NaN) with guard bands around it; strided layouts leave gaps,
// and varlen tensors rows owned by no sequence, that must stay poisoned; the inputs (q, k, v, out,
// dout, lse) must come back byte-identical. Rows that see no key must get exactly dQ = 0, keys no
// query sees exactly dK = dV = 0.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "common/gpu_testing.h"
#include "flashattn/flashattn.h"
#include "ref/reference.h"

namespace fa_test::bwd {

enum class Slopes { none, heads, batch_heads };

// A backward case: the problem (GpuCase), ALiBi slopes per head or per (batch, head), and the
// deterministic mode.
struct Case : GpuCase {
  Slopes alibi = Slopes::none;
  bool deterministic = false;
};

inline std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// Inputs on the device and the host, our forward's out/lse on the device, and the gradients of
// the last backward() read back.
class BwdProblem {
 public:
  explicit BwdProblem(const Case& c) : c_(c) {}

  // Random inputs (never zeros) uploaded in the case's layout, then our CUDA forward.
  ::testing::AssertionResult setup();

  // Poisoned gradients, our backward, then: nothing written outside the gradient views (guards,
  // gaps, unowned varlen rows), inputs untouched; the gradients read back (dense, owned rows).
  ::testing::AssertionResult backward(bool deterministic, void* stream = nullptr);

  // The fp64 oracle on host copies, restricted to the owned rows.
  ref::BackwardResult oracle() const;

  // The standard attention (forward + backward in the input dtype), per sequence for varlen.
  struct Base {
    std::vector<double> dq, dk, dv;
  };
  ::testing::AssertionResult baseline(Base& base) const;

  // Exact zeros where nothing flows: dQ of rows that see no key, dK/dV of keys no row sees.
  ::testing::AssertionResult empty_rows_and_keys_exact() const;

  const Case& config() const { return c_; }

  // The last backward's gradients: dense over owned rows, and the raw device bytes.
  std::vector<double> dq, dk, dvv;
  std::vector<uint8_t> raw_dq, raw_dk, raw_dv;
  std::string kernel;  // the main kernel the last backward() ran (cuda::backward_kernel)

 private:
  struct HostViews {
    Tensor q, k, v, dout;
    Options opt;
    flashattn::VarlenLayout layout;
    std::vector<int32_t> cu_q, cu_k;
  };
  HostViews host_views() const;

  Tensor tq() const { return make_tensor(gq_->data(), c_.dtype, pq_, Device::cuda(0)); }
  Tensor tk() const { return make_tensor(gk_->data(), c_.dtype, pk_, Device::cuda(0)); }
  Tensor tv() const { return make_tensor(gv_->data(), c_.dtype, pv_, Device::cuda(0)); }
  Tensor tdo() const { return make_tensor(gdo_->data(), c_.dtype, po_, Device::cuda(0)); }
  Tensor to() const { return make_tensor(go_->data(), c_.dtype, po_, Device::cuda(0)); }
  Tensor tl() const { return make_tensor(gl_->data(), DType::f32, pl_, Device::cuda(0)); }
  Tensor tdq() const { return make_tensor(gdq_->data(), c_.dtype, pq_, Device::cuda(0)); }
  Tensor tdk() const { return make_tensor(gdk_->data(), c_.dtype, pk_, Device::cuda(0)); }
  Tensor tdv() const { return make_tensor(gdv_->data(), c_.dtype, pv_, Device::cuda(0)); }

  Case c_;
  Options opt_;
  flashattn::VarlenLayout layout_;
  int64_t rows_q_ = 0, rows_k_ = 0;
  std::vector<int32_t> cu_q_, cu_k_;
  std::vector<uint16_t> hq_, hk_, hv_, hdo_;
  std::vector<float> slopes_;
  Placed pq_, pk_, pv_, po_, pl_;
  std::optional<DeviceBuffer> gq_, gk_, gv_, gdo_, go_, gl_, gcu_q_, gcu_k_, gslopes_, gdq_, gdk_, gdv_;
  std::vector<std::vector<uint8_t>> inputs_before_;
};

// The whole check of one case: backward, then the oracle rule for dQ, dK, dV and exact zeros.
void check_case(const Case& c);

}  // namespace fa_test::bwd
