// The CUDA backend's forward entry point: checks what only this backend requires, picks the
// kernel family (sm90 where it covers the call, else the sm80 decode or main kernel) and its
// instantiation from the generated table, and launches on the tensors' device and the caller's
// stream.
#include <algorithm>
#include <string>

#include "core/knobs.h"
#include "cuda/backend.h"
#include "cuda/common/call_checks.h"
#include "cuda/common/check.h"
#include "cuda/common/kernel_table.h"
#include "cuda/inst/kernel_table.h"
#include "cuda/sm80/launch.h"
#include "flashattn/error.h"
#if FLASHATTN_CUDA_SM90
#include "cuda/sm90/dispatch.h"  // the Hopper forward (builds with the 90a arch)
#endif

namespace flashattn::cuda {
namespace {

using Launch = void (*)(const AttnParams&, int, cudaStream_t);
#define LAUNCH(hdim, T) &sm80::run_fwd<hdim, T>
constexpr KernelEntry<Launch> kForward[] = {FLASHATTN_FWD_SM80_KERNELS(FLASHATTN_KERNEL_ENTRY){}};
#undef LAUNCH
#define LAUNCH(hdim, T) &sm80::run_decode<hdim, T>
constexpr KernelEntry<Launch> kDecode[] = {FLASHATTN_DECODE_SM80_KERNELS(FLASHATTN_KERNEL_ENTRY){}};
#undef LAUNCH

// Decoding (few packed query rows per kv head): the decode kernel, which reads each K/V byte once
// per kv head. FLASHATTN_CUDA_DECODE=0 sends everything to the main kernel (tests, benchmarks).
bool use_decode_kernel(const AttnParams& p) {
  return knobs().cuda_decode && p.seqlen_q * p.group_size() <= sm80::kDecodeMaxPackedRows;
}

// The sm80 instantiation for the call (decode kernel or main kernel); throws when the build has
// none that holds its head dims.
const KernelEntry<Launch>& sm80_kernel(const AttnParams& p, bool decode) {
  const int need = std::max(p.head_dim, p.head_dim_v);
  const KernelEntry<Launch>* e = decode ? find_kernel(kDecode, need, p.dtype) : find_kernel(kForward, need, p.dtype);
  if (!e)
    throw Unsupported("flashattn: CUDA forward: head_dim " + std::to_string(need) +
                      " needs a kernel instantiated for at least that; this build has head dims {" +
                      head_dims_of(kForward) + "} (CMake knob FLASHATTN_CUDA_HEAD_DIMS)");
  return *e;
}

}  // namespace

void check_forward_supported(const AttnParams& p) {
  check_forward_call(p);
  sm80_kernel(p, use_decode_kernel(p));
}

void forward(const AttnParams& p) {
  if (p.sinks) return forward_with_sinks(p);  // folds the sinks in after the forward (sinks.cu)
  check_forward_call(p);
  const bool decode = use_decode_kernel(p);
  const KernelEntry<Launch>& sm80 = sm80_kernel(p, decode);

  const int device = p.device.index;
  DeviceGuard guard(device);
  require_sm80(device, "the CUDA forward");
  if (p.batch == 0 || p.total_q == 0 || p.seqlen_q == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
#if FLASHATTN_CUDA_SM90
  // Hopper: the sm90a kernel wherever it covers the call (FLASHATTN_CUDA_FORWARD=sm80 opts out),
  // except decoding: a few query rows per kv head fill none of its 64-row warpgroup tiles, and
  // the decode kernel's split-KV reads K/V at the memory's rate.
  if (!decode)
    if (const sm90::Selection s = sm90::select(p, device); s.use) return sm90::run(p, s, device, stream);
#endif
  sm80.launch(p, device, stream);
}

std::string forward_kernel(const AttnParams& p) {
  const int device = p.device.index;
  DeviceGuard guard(device);
  const bool decode = use_decode_kernel(p);
#if FLASHATTN_CUDA_SM90
  if (!decode)
    if (const sm90::Selection s = sm90::select(p, device); s.use) return sm90::kernel_name(p, s);
#endif
  const int need = std::max(p.head_dim, p.head_dim_v);
  const KernelEntry<Launch>* e = decode ? find_kernel(kDecode, need, p.dtype) : find_kernel(kForward, need, p.dtype);
  if (!e) return "none (no CUDA forward instantiated for head dim " + std::to_string(need) + ")";
  return (decode ? "decode_sm80<hdim " : "flash_fwd_sm80<hdim ") + std::to_string(e->head_dim) + ">";
}

bool available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the sticky-free error and say no
    return false;
  }
  if (count <= 0) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major >= 8;
}

}  // namespace flashattn::cuda
