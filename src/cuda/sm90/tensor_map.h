// TMA tensor maps, built on the host with the driver's cuTensorMapEncodeTiled. The driver entry
// point is looked up at run time through the CUDA runtime (cudaGetDriverEntryPointByVersion), so
// the library never links libcuda at build time.
#pragma once

#include <cuda.h>  // CUtensorMap and the enums (types only)

#include <cstdint>
#include <string>

#include "flashattn/tensor.h"

namespace flashattn::cuda::sm90 {

// A (dim0 = columns, rows, heads, batch) view of a 16-bit tensor whose columns are contiguous;
// strides in elements. Boxes of box_cols x box_rows land in shared memory with the 128-byte
// swizzle; elements outside the tensor read as zeros and are never written.
struct TensorView4d {
  const void* data = nullptr;
  DType dtype = DType::bf16;
  int64_t cols = 0, rows = 0, heads = 0, batch = 0;
  int64_t row_stride = 0, head_stride = 0, batch_stride = 0;
};

// Empty when `view` meets the TMA rules (16-byte aligned base and strides, strides < 2^40, sizes
// < 2^32); otherwise what is wrong.
std::string tensor_map_problem(const TensorView4d& view);

// Throws std::runtime_error naming `what` if the driver rejects the map.
CUtensorMap make_tensor_map(const TensorView4d& view, int box_cols, int box_rows, const char* what);

}  // namespace flashattn::cuda::sm90
