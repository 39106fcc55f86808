#include "cuda/common/call_checks.h"

#include <cstdint>
#include <string>

#include "flashattn/error.h"

namespace flashattn::cuda {
namespace {

// Each row of a tensor must start 16-byte aligned.
void check_rows_aligned(const char* name, const void* data, const Strides& s, int64_t batch, int64_t rows,
                        int64_t heads) {
  const auto addr = reinterpret_cast<uintptr_t>(data);
  auto bad_stride = [](int64_t stride, int64_t size) { return size > 1 && stride % 8 != 0; };
  if (addr % 16 != 0)
    throw Error(name, "a 16-byte aligned data pointer on CUDA (rows are moved as 16-byte vectors)",
                "address " + std::to_string(addr));
  if (bad_stride(s.batch, batch) || bad_stride(s.row, rows) || bad_stride(s.head, heads))
    throw Error(name, "batch/row/head strides that are multiples of 8 elements on CUDA (16-byte rows)",
                "strides (" + std::to_string(s.batch) + ", " + std::to_string(s.row) + ", " +
                    std::to_string(s.head) + ")");
}

// Row counts of q-shaped and k-shaped tensors. Varlen tensors have no batch dimension, and the
// packed key count is not known here (it lives in cu_seqlens_k): every row stride is checked.
struct Rows {
  int64_t batch, q, k;
};
Rows rows_of(const AttnParams& p) {
  return {p.cu_seqlens_q ? 1 : p.batch, p.cu_seqlens_q ? p.total_q : p.seqlen_q,
          p.cu_seqlens_k ? INT64_MAX : p.seqlen_k};
}

}  // namespace

void check_forward_call(const AttnParams& p) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) throw Error("q", "fp16 or bf16 on CUDA", dtype_name(p.dtype));
  if (p.head_dim % 8 != 0)
    throw Error("q", "a head_dim that is a multiple of 8 on CUDA (rows move as 16-byte vectors)",
                std::to_string(p.head_dim));
  if (p.head_dim_v % 8 != 0)
    throw Error("v", "a head_dim_v that is a multiple of 8 on CUDA (rows move as 16-byte vectors)",
                std::to_string(p.head_dim_v));
  const Rows r = rows_of(p);
  check_rows_aligned("q", p.q, p.q_stride, r.batch, r.q, p.heads);
  check_rows_aligned("k", p.k, p.k_stride, r.batch, r.k, p.heads_k);
  check_rows_aligned("v", p.v, p.v_stride, r.batch, r.k, p.heads_k);
  check_rows_aligned("out", p.out, p.out_stride, r.batch, r.q, p.heads);
}

void check_backward_call(const BwdParams& p) {
  check_forward_call(p);
  const Rows r = rows_of(p);
  check_rows_aligned("dout", p.dout, p.dout_stride, r.batch, r.q, p.heads);
  check_rows_aligned("dq", p.dq, p.dq_stride, r.batch, r.q, p.heads);
  check_rows_aligned("dk", p.dk, p.dk_stride, r.batch, r.k, p.heads_k);
  check_rows_aligned("dv", p.dv, p.dv_stride, r.batch, r.k, p.heads_k);
}

}  // namespace flashattn::cuda
