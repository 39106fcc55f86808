#include "cuda/sm90/tensor_map.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <mutex>
#include <stdexcept>

namespace flashattn::cuda::sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    else
      cudaGetLastError();  // not sticky; leave no error behind for the caller's next check
  });
  if (!fn)
    throw std::runtime_error(
        "flashattn: the CUDA driver offers no cuTensorMapEncodeTiled (driver older than CUDA 12?)");
  return fn;
}

constexpr uint64_t kMaxStrideBytes = uint64_t(1) << 40;

// A size-1 dimension's stride is never used; the driver still wants a multiple of 16.
uint64_t stride_bytes(int64_t stride_elems, int64_t size) { return size > 1 ? uint64_t(stride_elems) * 2 : 16; }

}  // namespace

std::string tensor_map_problem(const TensorView4d& v) {
  if (reinterpret_cast<uintptr_t>(v.data) % 16 != 0) return "a base address that is not 16-byte aligned";
  const int64_t sizes[3] = {v.rows, v.heads, v.batch};
  const int64_t strides[3] = {v.row_stride, v.head_stride, v.batch_stride};
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] < 1 || uint64_t(sizes[i]) >= (uint64_t(1) << 32)) return "a dimension outside [1, 2^32)";
    if (sizes[i] == 1) continue;
    if (strides[i] <= 0) return "a non-positive stride";
    const uint64_t b = stride_bytes(strides[i], sizes[i]);
    if (b % 16 != 0 || b >= kMaxStrideBytes) return "a stride that is not a multiple of 16 bytes below 2^40";
  }
  if (v.cols < 8 || v.cols % 8 != 0) return "rows that are not whole 16-byte chunks";
  return {};
}

CUtensorMap make_tensor_map(const TensorView4d& v, int box_cols, int box_rows, const char* what) {
  CUtensorMap map{};
  const cuuint64_t dims[4] = {cuuint64_t(v.cols), cuuint64_t(v.rows), cuuint64_t(v.heads), cuuint64_t(v.batch)};
  const cuuint64_t strides[3] = {stride_bytes(v.row_stride, v.rows), stride_bytes(v.head_stride, v.heads),
                                 stride_bytes(v.batch_stride, v.batch)};
  const cuuint32_t box[4] = {cuuint32_t(box_cols), cuuint32_t(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode_fn()(&map, v.dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                 4, const_cast<void*>(v.data), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("flashattn: cuTensorMapEncodeTiled rejected the tensor map of ") + what +
                             " (CUresult " + std::to_string(int(r)) + ")");
  return map;
}

}  // namespace flashattn::cuda::sm90
