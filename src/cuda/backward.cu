// The CUDA backend's backward entry point: checks what only this backend requires, picks the
// kernel family (sm90 where it covers the call, else sm80) and its instantiation from the
// generated table, and runs it on the tensors' device and the caller's stream.
#include <algorithm>
#include <string>

#include "cuda/backend.h"
#include "cuda/common/call_checks.h"
#include "cuda/common/check.h"
#include "cuda/common/kernel_table.h"
#include "cuda/inst/kernel_table.h"
#include "cuda/sm80/bwd_launch.h"
#include "flashattn/error.h"
#if FLASHATTN_CUDA_SM90
#include "cuda/sm90/dispatch.h"  // the Hopper backward (builds with the 90a arch)
#endif

namespace flashattn::cuda {
namespace {

using Launch = void (*)(const BwdParams&, int, cudaStream_t);
#define LAUNCH(hdim, T) &sm80::run_bwd<hdim, T>
constexpr KernelEntry<Launch> kBackward[] = {FLASHATTN_BWD_SM80_KERNELS(FLASHATTN_KERNEL_ENTRY){}};
#undef LAUNCH

}  // namespace

void backward(const BwdParams& p) {
  check_backward_call(p);
  const int need = std::max(p.head_dim, p.head_dim_v);
  const KernelEntry<Launch>* sm80 = find_kernel(kBackward, need, p.dtype);
  if (!sm80)
    throw Unsupported("flashattn: CUDA backward: head_dim " + std::to_string(need) +
                      " needs a kernel instantiated for at least that; this build has head dims {" +
                      head_dims_of(kBackward) + "} (CMake knob FLASHATTN_CUDA_HEAD_DIMS)");

  const int device = p.device.index;
  DeviceGuard guard(device);
  require_sm80(device, "the CUDA backward");
  if (p.batch == 0) return;
  // No queries still leaves dK = dV = 0 to write, no keys dQ = 0: the kernels handle both.
  auto stream = static_cast<cudaStream_t>(p.stream);
#if FLASHATTN_CUDA_SM90
  // Hopper: the sm90a kernel wherever it covers the call (FLASHATTN_CUDA_BACKWARD=sm80 opts out).
  if (const sm90::BwdSelection s = sm90::select_bwd(p, device); s.use) return sm90::run(p, s, device, stream);
#endif
  sm80->launch(p, device, stream);
}

std::string backward_kernel(const BwdParams& p) {
  const int device = p.device.index;
  DeviceGuard guard(device);
#if FLASHATTN_CUDA_SM90
  if (const sm90::BwdSelection s = sm90::select_bwd(p, device); s.use) return sm90::kernel_name(p, s);
#endif
  const int need = std::max(p.head_dim, p.head_dim_v);
  const KernelEntry<Launch>* e = find_kernel(kBackward, need, p.dtype);
  if (!e) return "none (no CUDA backward instantiated for head dim " + std::to_string(need) + ")";
  return "flash_bwd_sm80<hdim " + std::to_string(e->head_dim) + ">";
}

}  // namespace flashattn::cuda
