// Memory on the benchmark's device: host memory for the CPU, cudaMalloc'd memory for CUDA
// (only in builds with the CUDA backend; elsewhere the CUDA calls throw flashattn::Unsupported).
#pragma once

#include <cstddef>

#include "flashattn/tensor.h"

namespace flashattn::bench {

void* device_alloc(size_t bytes, flashattn::Device device);
void device_free(void* data, flashattn::Device device);
void copy_to_device(void* dst, const void* src, size_t bytes, flashattn::Device device);
void copy_to_host(void* dst, const void* src, size_t bytes, flashattn::Device device);
void fill_bytes(void* data, int byte, size_t bytes, flashattn::Device device);
// Waits for the device's queued work (kernels launch asynchronously); a no-op on the CPU.
void synchronize(flashattn::Device device);

}  // namespace flashattn::bench
