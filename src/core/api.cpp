// The public entry points: validate, then dispatch by the tensors' device.
#include "core/check_device_values.h"
#include "core/validate.h"
#include "cpu/backend.h"
#include "cuda/backend.h"
#include "flashattn/flashattn.h"

namespace flashattn {
namespace {

// Runs `cpu_fn` or `cuda_fn` on the params' device.
template <typename Params, typename CpuFn, typename CudaFn>
void dispatch(const Params& p, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (p.device.kind == DeviceKind::cpu) {
    cpu_fn(p);
    return;
  }
#if FLASHATTN_WITH_CUDA
  if (!cuda::available())
    throw Unsupported("flashattn: tensors are on " + device_name(p.device) +
                      " but no usable CUDA device is present (no GPU or driver, or a GPU older than sm80)");
  cuda_fn(p);
#else
  (void)cuda_fn;
  throw Unsupported("flashattn: tensors are on " + device_name(p.device) +
                    " but this build has no CUDA backend (configure with nvcc available)");
#endif
}

}  // namespace

void forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
             const Tensor& lse, const Options& options) {
  const AttnParams p = core::check_forward(q, k, v, out, lse, options, nullptr);
  core::check_device_values(p);
  dispatch(p, cpu::forward, [](const AttnParams& x) { cuda::forward(x); });
}

void forward_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& lse, const VarlenLayout& layout, const Options& options) {
  const AttnParams p = core::check_forward(q, k, v, out, lse, options, &layout);
  core::check_device_values(p);
  dispatch(p, cpu::forward, [](const AttnParams& x) { cuda::forward(x); });
}

void forward_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                     const Tensor& out, const Tensor& lse, const Options& options) {
  const KVCacheParams p = core::check_kvcache(q, k_new, v_new, cache, out, lse, options);
  core::check_device_values(p);
  dispatch(p.attn, [&](const AttnParams&) { cpu::forward_kvcache(p); },
           [&](const AttnParams&) { cuda::forward_kvcache(p); });
}

void sink_gradient(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& sinks,
                   const Tensor& dsinks, const VarlenLayout* layout, const Options& options) {
  const SinkGradParams p = core::check_sink_gradient(dout, out, lse, sinks, dsinks, layout, options);
  dispatch(p, cpu::sink_gradient, [](const SinkGradParams& x) { cuda::sink_gradient(x); });
}

void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
              const Tensor& dv, const Options& options) {
  const BwdParams p = core::check_backward(dout, q, k, v, out, lse, dq, dk, dv, options, nullptr);
  dispatch(p, cpu::backward, [](const BwdParams& x) { cuda::backward(x); });
}

void backward_varlen(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                     const Tensor& dv, const VarlenLayout& layout, const Options& options) {
  const BwdParams p = core::check_backward(dout, q, k, v, out, lse, dq, dk, dv, options, &layout);
  core::check_device_values(p);
  dispatch(p, cpu::backward, [](const BwdParams& x) { cuda::backward(x); });
}

void merge(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& out,
           const Tensor& lse, const Options& options) {
  const MergeParams p = core::check_merge(partial_out, partial_lse, out, lse, options);
  dispatch(p, cpu::merge, [](const MergeParams& x) { cuda::merge(x); });
}

bool cuda_available() {
#if FLASHATTN_WITH_CUDA
  return cuda::available();
#else
  return false;
#endif
}

const char* version() { return FLASHATTN_VERSION; }

}  // namespace flashattn
