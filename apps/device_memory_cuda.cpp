// device_memory.h for builds with the CUDA backend.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "device_memory.h"
#include "flashattn/error.h"

namespace flashattn::bench {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw flashattn::Unsupported(std::string("flashattn-bench: ") + what + ": " + cudaGetErrorString(status));
}

bool on_cpu(flashattn::Device d) { return d.kind == flashattn::DeviceKind::cpu; }

}  // namespace

void* device_alloc(size_t bytes, flashattn::Device device) {
  bytes = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  if (on_cpu(device)) return std::aligned_alloc(64, bytes);
  check(cudaSetDevice(device.index), "cudaSetDevice");
  void* p = nullptr;
  check(cudaMalloc(&p, bytes), "cudaMalloc");
  return p;
}

void device_free(void* data, flashattn::Device device) {
  if (on_cpu(device))
    std::free(data);
  else
    cudaFree(data);
}

void copy_to_device(void* dst, const void* src, size_t bytes, flashattn::Device device) {
  if (on_cpu(device))
    std::memcpy(dst, src, bytes);
  else
    check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
}

void copy_to_host(void* dst, const void* src, size_t bytes, flashattn::Device device) {
  if (on_cpu(device))
    std::memcpy(dst, src, bytes);
  else
    check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
}

void fill_bytes(void* data, int byte, size_t bytes, flashattn::Device device) {
  if (on_cpu(device))
    std::memset(data, byte, bytes);
  else
    check(cudaMemset(data, byte, bytes), "cudaMemset");
}

void synchronize(flashattn::Device device) {
  if (!on_cpu(device)) check(cudaDeviceSynchronize(), "a kernel (cudaDeviceSynchronize)");
}

}  // namespace flashattn::bench
