#include "dlpack_view.h"

#include <cstring>

#include "flashattn/flashattn.h"

namespace nb = nanobind;
namespace fa = flashattn;

namespace flashattn_python {

std::string dlpack_dtype_name(nb::dlpack::dtype t) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
    default: break;  // the float8/float6/float4 codes: "?"
  }
  return std::string(kind) + std::to_string(t.bits);
}

namespace {

// The arguments that hold indices (lengths, cache rows, page ids): int32; every other array: a float.
bool index_argument(const char* name) {
  static const char* const kIndexNames[] = {"cu_seqlens_q", "cu_seqlens_k", "seqused_k", "seqused_q", "cache_seqlens",
                                            "cache_batch_idx", "cache_leftpad", "page_table"};
  for (const char* n : kIndexNames)
    if (std::strcmp(n, name) == 0) return true;
  return false;
}

}  // namespace

fa::Tensor view(nb::dlpack::dtype dt, int device_type, int device_id, int64_t ndim, const int64_t* shape,
                const int64_t* strides, void* data, const char* name) {
  fa::Tensor t;
  auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes != 1) throw fa::Error(name, "a scalar dtype", dlpack_dtype_name(dt) + " x" + std::to_string(dt.lanes));
  if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) t.dtype = fa::DType::f32;
  else if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) t.dtype = fa::DType::f16;
  else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) t.dtype = fa::DType::bf16;
  else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) t.dtype = fa::DType::i32;
  else throw fa::Error(name, index_argument(name) ? "int32" : "float32, float16 or bfloat16", dlpack_dtype_name(dt));

  if (device_type == nb::device::cpu::value) t.device = fa::Device::cpu();
  else if (device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value)
    t.device = fa::Device::cuda(device_id);
  else throw fa::Error(name, "a CPU or CUDA array", "DLPack device type " + std::to_string(device_type));

  if (ndim < 0 || ndim > fa::Tensor::kMaxRank)
    throw fa::Error(name, "a rank between 1 and 6", std::to_string(ndim));
  t.rank = static_cast<int>(ndim);
  int64_t compact = 1;  // DLPack's strides may be absent: then the array is row-major
  for (int i = t.rank - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = strides ? strides[i] : compact;  // DLPack strides are in elements already
    compact *= shape[i];
  }
  t.data = data;
  return t;
}

}  // namespace flashattn_python
