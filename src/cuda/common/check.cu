#include "cuda/common/check.h"

#include <stdexcept>
#include <string>

#include "flashattn/error.h"

namespace flashattn::cuda {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("flashattn: CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

void check_launch(const char* kernel, const char* file, int line) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("flashattn: launching CUDA kernel ") + kernel + " failed (" + file +
                             ":" + std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

DeviceGuard::DeviceGuard(int device) {
  FA_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) FA_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

int require_sm80(int device, const char* what) {
  int major = 0, minor = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major < 8)
    throw Unsupported(std::string("flashattn: ") + what + " needs an sm80+ GPU (Ampere or newer); cuda:" +
                      std::to_string(device) + " is sm_" + std::to_string(major) + std::to_string(minor));
  return 10 * major + minor;
}

int max_smem_per_block(int device) {
  int bytes = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

}  // namespace flashattn::cuda
