// A non-owning view of a strided tensor: what every entry point takes.
// No CUDA or torch headers here: this is what the binding, the CLI and users include.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace flashattn {

enum class DType : uint8_t { f32, f16, bf16, i32 };
enum class DeviceKind : uint8_t { cpu, cuda };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;  // CUDA ordinal; ignored on the CPU

  static Device cpu() { return {DeviceKind::cpu, 0}; }
  static Device cuda(int index = 0) { return {DeviceKind::cuda, index}; }
  bool operator==(const Device&) const = default;
};

size_t dtype_size(DType t);
const char* dtype_name(DType t);
std::string device_name(Device d);

// Shape and strides are in elements. The last dimension must be contiguous for q/k/v/o and
// their gradients; everything else may be strided (a slice of a packed qkv tensor, say).
struct Tensor {
  static constexpr int kMaxRank = 6;

  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> stride{};

  // A dense row-major view of `shape`.
  static Tensor contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                           Device device = Device::cpu());
  // A view with explicit strides (same rank as shape).
  static Tensor strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                        std::initializer_list<int64_t> stride, Device device = Device::cpu());

  bool defined() const { return data != nullptr; }
  int64_t size(int dim) const { return shape[dim < 0 ? dim + rank : dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;  // "[2, 128, 8, 64]"
};

}  // namespace flashattn
