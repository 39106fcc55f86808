// The GPU tests' shared helpers (gpu_testing.h).
#include "common/gpu_testing.h"

#include <cstdlib>

#include "flashattn/flashattn.h"

namespace fa_test {

bool gpu_present() {
  static const bool ok = flashattn::cuda_available();
  return ok;
}

bool expect_sm90() {
#if FLASHATTN_TEST_HAVE_SM90
  int major = 0, minor = 0;
  if (!gpu_present() || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

uint64_t seed_for(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ uint8_t(c)) * 1099511628211ull;
  if (const char* s = std::getenv("FLASHATTN_TEST_SEED")) h ^= std::strtoull(s, nullptr, 10);
  return h;
}

// ---- device buffers -------------------------------------------------------------------------

DeviceBuffer::DeviceBuffer(size_t esize, int64_t numel) : esize_(esize), numel_(numel) {
  bytes_ = kGuard * 2 + esize * size_t(std::max<int64_t>(numel, 1));
  if (cudaMalloc(&raw_, bytes_) != cudaSuccess) raw_ = nullptr;
}

DeviceBuffer::~DeviceBuffer() {
  if (raw_) cudaFree(raw_);
}

std::vector<uint8_t> DeviceBuffer::download() const {
  std::vector<uint8_t> h(bytes_);
  if (cudaMemcpy(h.data(), raw_, bytes_, cudaMemcpyDeviceToHost) != cudaSuccess) h.clear();
  return h;
}

bool DeviceBuffer::upload(const std::vector<uint8_t>& h) const {
  return h.size() == bytes_ && cudaMemcpy(raw_, h.data(), bytes_, cudaMemcpyHostToDevice) == cudaSuccess;
}

std::vector<uint8_t> DeviceBuffer::pattern_bytes(uint32_t pattern) const {
  std::vector<uint8_t> h(bytes_);
  for (size_t i = 0; i < bytes_; i += esize_) std::memcpy(&h[i], &pattern, std::min(esize_, bytes_ - i));
  return h;
}

// ---- layouts --------------------------------------------------------------------------------

Placed place(Shape4 x, GpuLayout layout, bool varlen) {
  Placed p;
  if (layout == GpuLayout::dense) {
    if (varlen) {
      p.shape = {x.s, x.h, x.d};
      p.stride = {x.h * x.d, x.d, 1};
    } else {
      p.shape = {x.b, x.s, x.h, x.d};
      p.stride = {x.s * x.h * x.d, x.h * x.d, x.d, 1};
    }
    p.numel = x.b * x.s * x.h * x.d;
    return p;
  }
  const int64_t dp = x.d + 8;  // a gap of 8 elements after each row: must stay untouched
  if (varlen) {
    p.shape = {x.s, x.h, x.d};
    p.stride = {dp, x.s * dp, 1};
  } else {
    p.shape = {x.b, x.s, x.h, x.d};
    p.stride = {x.h * x.s * dp, dp, x.s * dp, 1};
  }
  p.numel = x.b * x.h * x.s * dp;
  return p;
}

Tensor make_tensor(void* data, DType t, const Placed& p, Device dev) {
  Tensor x;
  x.data = data;
  x.dtype = t;
  x.device = dev;
  x.rank = int(p.shape.size());
  for (int i = 0; i < x.rank; ++i) {
    x.shape[i] = p.shape[i];
    x.stride[i] = p.stride[i];
  }
  return x;
}

// ---- cases ----------------------------------------------------------------------------------

Options GpuCase::options() const {
  Options opt;
  opt.causal = causal;
  opt.window_left = wl;
  opt.window_right = wr;
  opt.softcap = softcap;
  opt.softmax_scale = scale;
  return opt;
}

std::tuple<std::vector<int32_t>, std::vector<int32_t>, int64_t, int64_t> packed_rows(const GpuCase& c) {
  std::vector<int32_t> cu_q{0}, cu_k{0};
  int64_t rows_q = int64_t(c.batch) * c.sq, rows_k = int64_t(c.batch) * c.sk;
  if (c.varlen()) {
    for (size_t i = 0; i < c.lens_q.size(); ++i) {
      cu_q.push_back(cu_q.back() + c.lens_q[i]);
      cu_k.push_back(cu_k.back() + c.lens_k[i]);
    }
    rows_q = cu_q.back() + 3;
    rows_k = cu_k.back() + 3;
  }
  return {cu_q, cu_k, rows_q, rows_k};
}

Placed place_lse(const GpuCase& c, int64_t rows_q) {
  Placed p;
  if (c.varlen()) {
    p.shape = {c.heads, rows_q};
    p.stride = {rows_q, 1};
  } else {
    p.shape = {c.batch, c.heads, c.sq};
    p.stride = {int64_t(c.heads) * c.sq, c.sq, 1};
  }
  p.numel = int64_t(c.heads) * rows_q;
  return p;
}

// ---- host data ------------------------------------------------------------------------------
// testing.h's conversions, independent of the library's core/half.h (they agree on every value
// but NaN payloads).
uint16_t to_bits(DType t, float v) { return t == DType::bf16 ? float_to_bf16_bits(v) : float_to_f16_bits(v); }
double from_bits(DType t, uint16_t b) { return t == DType::bf16 ? bf16_bits_to_float(b) : f16_bits_to_float(b); }

bool upload_placed(const DeviceBuffer& g, const Placed& p, const std::vector<uint16_t>& dense, uint32_t gap) {
  auto bytes = g.pattern_bytes(gap);
  for_each_placed(p, [&](int64_t n, int64_t off) { std::memcpy(&bytes[g.element_byte(off)], &dense[n], 2); });
  return g.upload(bytes);
}

}  // namespace fa_test
