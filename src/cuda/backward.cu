// The CUDA backend's backward entry point: checks what only this backend requires, picks the
// instantiated head dim, and runs the sm80 backward on the tensors' device and the caller's stream.
#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/backend.h"
#include "cuda/common/check.h"
#include "cuda/sm80/bwd_launch.h"
#include "flashattn/error.h"
#if FLASHATTN_CUDA_SM90
#include "cuda/sm90/bwd_dispatch.h"  // the Hopper backward (builds with the 90a arch)
#endif

namespace flashattn::cuda {
namespace {

// The head dims this build instantiated (CMake knob FLASHATTN_CUDA_HEAD_DIMS), ascending.
constexpr int kHeadDims[] = {
#if FLASHATTN_CUDA_HDIM_64
    64,
#endif
#if FLASHATTN_CUDA_HDIM_96
    96,
#endif
#if FLASHATTN_CUDA_HDIM_128
    128,
#endif
#if FLASHATTN_CUDA_HDIM_192
    192,
#endif
#if FLASHATTN_CUDA_HDIM_256
    256,
#endif
    0};  // sentinel

std::string compiled_head_dims() {
  std::string s;
  for (int d : kHeadDims)
    if (d) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s.empty() ? "none" : s;
}

// The kernels move rows in 16-byte chunks: each row of every tensor must start 16-byte aligned.
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

template <typename T>
void run_head_dim(int hdim, const BwdParams& p, int device, cudaStream_t stream) {
  switch (hdim) {
#if FLASHATTN_CUDA_HDIM_64
    case 64: return sm80::run_bwd<64, T>(p, device, stream);
#endif
#if FLASHATTN_CUDA_HDIM_96
    case 96: return sm80::run_bwd<96, T>(p, device, stream);
#endif
#if FLASHATTN_CUDA_HDIM_128
    case 128: return sm80::run_bwd<128, T>(p, device, stream);
#endif
#if FLASHATTN_CUDA_HDIM_192
    case 192: return sm80::run_bwd<192, T>(p, device, stream);
#endif
#if FLASHATTN_CUDA_HDIM_256
    case 256: return sm80::run_bwd<256, T>(p, device, stream);
#endif
    default: break;
  }
  throw Unsupported("flashattn: internal error: no CUDA backward for head dim " + std::to_string(hdim));
}

}  // namespace

void backward(const BwdParams& p) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16)
    throw Error("q", "fp16 or bf16 on CUDA", dtype_name(p.dtype));
  if (p.head_dim % 8 != 0)
    throw Error("q", "a head_dim that is a multiple of 8 on CUDA (rows move as 16-byte vectors)",
                std::to_string(p.head_dim));
  if (p.head_dim_v % 8 != 0)
    throw Error("v", "a head_dim_v that is a multiple of 8 on CUDA (rows move as 16-byte vectors)",
                std::to_string(p.head_dim_v));
  const int64_t batch = p.cu_seqlens_q ? 1 : p.batch;  // varlen tensors have no batch dimension
  const int64_t rows_q = p.cu_seqlens_q ? p.total_q : p.seqlen_q;
  const int64_t rows_k = p.cu_seqlens_k ? INT64_MAX : p.seqlen_k;  // total_k unknown here: check all
  check_rows_aligned("q", p.q, p.q_stride, batch, rows_q, p.heads);
  check_rows_aligned("k", p.k, p.k_stride, batch, rows_k, p.heads_k);
  check_rows_aligned("v", p.v, p.v_stride, batch, rows_k, p.heads_k);
  check_rows_aligned("out", p.out, p.out_stride, batch, rows_q, p.heads);
  check_rows_aligned("dout", p.dout, p.dout_stride, batch, rows_q, p.heads);
  check_rows_aligned("dq", p.dq, p.dq_stride, batch, rows_q, p.heads);
  check_rows_aligned("dk", p.dk, p.dk_stride, batch, rows_k, p.heads_k);
  check_rows_aligned("dv", p.dv, p.dv_stride, batch, rows_k, p.heads_k);

  // The padded head dim: the smallest instantiated one that holds both q/k and v rows.
  const int need = std::max(p.head_dim, p.head_dim_v);
  int hdim = 0;
  for (int d : kHeadDims)
    if (d >= need) {
      hdim = d;
      break;
    }
  if (!hdim)
    throw Unsupported("flashattn: CUDA backward: head_dim " + std::to_string(need) +
                      " needs a kernel instantiated for at least that; this build has head dims {" +
                      compiled_head_dims() + "} (CMake knob FLASHATTN_CUDA_HEAD_DIMS)");

  const int device = p.device.index;
  DeviceGuard guard(device);
  require_sm80(device, "the CUDA backward");
  if (p.batch == 0) return;
  // No queries still leaves dK = dV = 0 to write, no keys dQ = 0: the kernels handle both.
  auto stream = static_cast<cudaStream_t>(p.stream);
#if FLASHATTN_CUDA_SM90
  // Hopper: the sm90a kernel wherever it covers the call (FLASHATTN_CUDA_BACKWARD=sm80 opts out).
  if (const sm90::BwdSelection s = sm90::select_bwd(p, device); s.use) return sm90::run(p, s, device, stream);
#endif
  if (p.dtype == DType::bf16)
    run_head_dim<__nv_bfloat16>(hdim, p, device, stream);
  else
    run_head_dim<__half>(hdim, p, device, stream);
}

std::string backward_kernel(const BwdParams& p) {
  const int device = p.device.index;
  DeviceGuard guard(device);
#if FLASHATTN_CUDA_SM90
  if (const sm90::BwdSelection s = sm90::select_bwd(p, device); s.use) return s.kernel;
#endif
  const int need = std::max(p.head_dim, p.head_dim_v);
  for (int d : kHeadDims)
    if (d >= need) return "flash_bwd_sm80<hdim " + std::to_string(d) + ">";
  return "none (no CUDA backward instantiated for head dim " + std::to_string(need) + ")";
}

}  // namespace flashattn::cuda
