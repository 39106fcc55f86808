// Error handling of the CUDA backend: every runtime call is checked, and a failed launch
// becomes an exception that names the kernel.
#pragma once

#include <cuda_runtime.h>

namespace flashattn::cuda {

// Throws std::runtime_error("flashattn: CUDA error in <what> (<file>:<line>): <name>: <text>").
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);

// After a launch: turns a launch error (bad configuration, no kernel image for this GPU, ...)
// into an exception naming `kernel`.
void check_launch(const char* kernel, const char* file, int line);

// Makes `device` current for the lifetime of the guard and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Compute capability of `device` as 10 * major + minor (80 = sm_80). Throws
// flashattn::Unsupported when the device is older than sm_80 (the kernels need mma.sync bf16,
// cp.async and ldmatrix).
int require_sm80(int device, const char* what);

// The most dynamic shared memory one block of a kernel may opt in to on `device`.
int max_smem_per_block(int device);

}  // namespace flashattn::cuda

#define FA_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t fa_err_ = (call);                                                  \
    if (fa_err_ != cudaSuccess) ::flashattn::cuda::throw_cuda_error(fa_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define FA_CHECK_LAUNCH(kernel_name) ::flashattn::cuda::check_launch((kernel_name), __FILE__, __LINE__)
