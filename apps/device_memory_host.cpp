// device_memory.h for builds without CUDA: host memory only.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "device_memory.h"
#include "flashattn/error.h"

namespace flashattn::bench {
namespace {

void require_cpu(flashattn::Device d) {
  if (d.kind != flashattn::DeviceKind::cpu)
    throw flashattn::Unsupported("flashattn-bench: this build has no CUDA backend; use --device cpu");
}

}  // namespace

void* device_alloc(size_t bytes, flashattn::Device device) {
  require_cpu(device);
  return std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
}
void device_free(void* data, flashattn::Device) { std::free(data); }
void copy_to_device(void* dst, const void* src, size_t bytes, flashattn::Device device) {
  require_cpu(device);
  std::memcpy(dst, src, bytes);
}
void copy_to_host(void* dst, const void* src, size_t bytes, flashattn::Device device) {
  require_cpu(device);
  std::memcpy(dst, src, bytes);
}
void fill_bytes(void* data, int byte, size_t bytes, flashattn::Device device) {
  require_cpu(device);
  std::memset(data, byte, bytes);
}
void synchronize(flashattn::Device) {}

}  // namespace flashattn::bench
