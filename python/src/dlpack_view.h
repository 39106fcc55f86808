// DLPack's description of an array -> a flashattn::Tensor view, shared by the nanobind entries
// (nb::ndarray) and the eager fast path (eager_forward.cpp), so both accept and refuse the same
// arrays with the same messages.
#pragma once

#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "flashattn/tensor.h"

namespace flashattn_python {

std::string dlpack_dtype_name(nanobind::dlpack::dtype t);

// float32/float16/bfloat16/int32 on the CPU or a CUDA device, rank <= 6; strides nullptr = row-major
// (DLPack's compact layout). Throws flashattn::Error naming the argument.
flashattn::Tensor view(nanobind::dlpack::dtype dt, int device_type, int device_id, int64_t ndim, const int64_t* shape,
                       const int64_t* strides, void* data, const char* name);

}  // namespace flashattn_python
