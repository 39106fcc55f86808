// Shared helpers of the GPU tests (tests/cuda): the skip without a usable GPU, device buffers with
// guard bands, the layouts the tests place tensors in (dense, or strided with gaps that must stay
// untouched), the bf16/fp16 bits of host data, and the forward suites' name-derived seeds.
//
// Needs the CUDA runtime, so it is its own target (flashattn_test_gpu_common, made only in CUDA
// builds): the CPU suite's helpers (testing.h, flashattn_test_common) stay CUDA-free.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/testing.h"

namespace fa_test {

// A CUDA runtime call that must succeed (ASSERT_: returns from the enclosing void function).
#define CUDA_OK(call)                                                      \
  do {                                                                     \
    const cudaError_t e_ = (call);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_); \
  } while (0)

// A usable sm80+ CUDA device (flashattn::cuda_available), asked once per process.
bool gpu_present();

// The first statement of every test that needs a GPU: CI machines without one skip it.
#define SKIP_WITHOUT_GPU() \
  if (!::fa_test::gpu_present()) GTEST_SKIP() << "no sm80+ CUDA device: GPU tests skipped"

// The device is an sm_90 GPU and this build has the sm90a kernels with head dims 64 and 128 (the
// CMake file defines FLASHATTN_TEST_HAVE_SM90 then): the calls they cover must run on them.
bool expect_sm90();

// A seed from a fixed name (FNV-1a), xor FLASHATTN_TEST_SEED if set: the forward suites draw their
// inputs from it (the backward suites use test_seed, which mixes in the running test's name).
uint64_t seed_for(const std::string& name);

// Poison for outputs: a quiet NaN in the 2-byte dtypes and in fp32, so an unwritten element fails.
constexpr uint32_t kNan16 = 0x7FC1u, kNan32 = 0x7FC00001u;

// ---- device buffers with guard bands --------------------------------------------------------
// A device allocation of `numel` elements of `esize` bytes plus kGuard bytes on both sides. The
// host-side byte image of all of it (guards included) is what the checks fill and compare: a
// kernel writing outside its view changes a byte no element owns.
class DeviceBuffer {
 public:
  static constexpr size_t kGuard = 512;  // bytes, a multiple of 16 (keeps data 16-byte aligned)

  DeviceBuffer(size_t esize, int64_t numel);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  bool ok() const { return raw_ != nullptr; }
  void* data() const { return static_cast<char*>(raw_) + kGuard; }
  int64_t numel() const { return numel_; }

  // The whole allocation (guards too) as host bytes (empty on a CUDA error) / from host bytes.
  std::vector<uint8_t> download() const;
  bool upload(const std::vector<uint8_t>& h) const;
  // Every element (and the guards) set to the element bit pattern `pattern`.
  std::vector<uint8_t> pattern_bytes(uint32_t pattern) const;
  size_t element_byte(int64_t offset) const { return kGuard + size_t(offset) * esize_; }
  size_t esize() const { return esize_; }

 private:
  size_t esize_;
  int64_t numel_;
  size_t bytes_ = 0;
  void* raw_ = nullptr;
};

// ---- layouts --------------------------------------------------------------------------------
enum class GpuLayout { dense, bhsd };  // bhsd: (b, h, s, d + 8) in memory, viewed as (b, s, h, d)

struct Shape4 {
  int64_t b, s, h, d;
};

// Shape, strides (in elements) and the allocation size of a placed tensor.
struct Placed {
  std::vector<int64_t> shape, stride;
  int64_t numel = 0;
};

// A (b, s, h, d) tensor (varlen: (s, h, d), s = the packed rows, b = 1) in `layout`.
Placed place(Shape4 x, GpuLayout layout, bool varlen);

Tensor make_tensor(void* data, DType t, const Placed& p, Device dev);

// fn(n, offset) for every element: n the logical (row-major over shape) index, offset the
// element's offset in memory.
template <typename Fn>
void for_each_placed(const Placed& p, Fn fn) {
  const int r = int(p.shape.size());
  std::vector<int64_t> idx(r, 0);
  int64_t total = 1;
  for (auto s : p.shape) total *= s;
  for (int64_t n = 0; n < total; ++n) {
    int64_t off = 0;
    for (int i = 0; i < r; ++i) off += idx[i] * p.stride[i];
    fn(n, off);
    for (int i = r - 1; i >= 0; --i) {
      if (++idx[i] < p.shape[i]) break;
      idx[i] = 0;
    }
  }
}

// ---- cases ----------------------------------------------------------------------------------
// What a forward and a backward case both say: the problem (shapes, dtype, mask, softcap, scale;
// ALiBi is each suite's own: the slopes are drawn differently), its layout and the small-tiles knob.
struct GpuCase {
  std::string name;
  int batch = 1, sq = 1, sk = 1, heads = 1, heads_k = 1, d = 64, dv = 0;
  DType dtype = DType::bf16;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0;
  std::optional<float> scale;
  bool small_tiles = false;  // FLASHATTN_CUDA_SMALL_TILES=1: the sm80 (163 KB smem) tiles on sm90 too
  GpuLayout layout = GpuLayout::dense;
  std::vector<int> lens_q, lens_k;  // varlen when non-empty (batch = lens_q.size())

  int head_dim_v() const { return dv ? dv : d; }
  bool varlen() const { return !lens_q.empty(); }
  // The mask, softcap and scale as options; the suite adds ALiBi and its own settings.
  Options options() const;
};

// The rows of c's q and k/v tensors: cu_seqlens {0} and batch x seqlen when fixed-length; for
// varlen the cu_seqlens of lens_q / lens_k and the packed rows: the sequences, then 3 rows owned
// by no sequence (they must stay untouched).
std::tuple<std::vector<int32_t>, std::vector<int32_t>, int64_t, int64_t> packed_rows(const GpuCase& c);

// The dense fp32 LSE of c: (batch, heads, sq), or (heads, rows_q) for varlen.
Placed place_lse(const GpuCase& c, int64_t rows_q);

// ---- host data ------------------------------------------------------------------------------
// The bits of v in the 2-byte dtype t (bf16 or fp16, nearest even), and back.
uint16_t to_bits(DType t, float v);
double from_bits(DType t, uint16_t b);

// Uploads `dense` (the 2-byte elements in logical order) into g's view p; every other byte (gaps,
// guards) holds the element pattern `gap`, which a wrong read would show.
bool upload_placed(const DeviceBuffer& g, const Placed& p, const std::vector<uint16_t>& dense, uint32_t gap);

}  // namespace fa_test
