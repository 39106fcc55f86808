#include "cuda/sm90/bwd_dispatch.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/common/check.h"
#include "cuda/sm90/bwd_launch.h"
#include "cuda/sm90/tensor_map.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm90 {
namespace {

// The head dims this build instantiated for the sm90 backward (its tiles exist for 64 and 128:
// bwd_traits.h), ascending; smaller head dims pad up to them.
constexpr int kBwdHeadDims[] = {
#if FLASHATTN_CUDA_SM90_HDIM_64
    64,
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    128,
#endif
    0};  // sentinel

enum class Force { kAuto, kSm80, kSm90 };

Force forced() {
  const char* v = std::getenv("FLASHATTN_CUDA_BACKWARD");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return Force::kAuto;
  if (std::strcmp(v, "sm80") == 0) return Force::kSm80;
  if (std::strcmp(v, "sm90") == 0) return Force::kSm90;
  throw Unsupported(std::string("flashattn: FLASHATTN_CUDA_BACKWARD=") + v + ": expected auto, sm80 or sm90");
}

// Empty when the sm90 backward covers the call; otherwise the first reason it does not.
std::string coverage_problem(const BwdParams& p, int device, int* head_dim) {
  int major = 0, minor = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0)
    return "the device is sm_" + std::to_string(major) + std::to_string(minor) + " (sm90a code runs on sm_90 only)";
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) return "dtype is not fp16 or bf16";
  if (p.cu_seqlens_q || p.cu_seqlens_k || p.seqused_k) return "varlen batches are not covered yet";
  const int need = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  *head_dim = 0;
  for (int d : kBwdHeadDims)
    if (d >= need) {
      *head_dim = d;
      break;
    }
  if (!*head_dim) return "no sm90 backward for head dim " + std::to_string(need) + " in this build";
  if (p.seqlen_q == 0 || p.seqlen_k == 0) return "an empty sequence (no tensor map for zero rows)";
  if (p.seqlen_q + p.seqlen_k >= (int64_t(1) << 30)) return "seqlen_q + seqlen_k >= 2^30 (the kernel's key bounds are int)";
  const TensorView4d views[6] = {
      {p.q, p.dtype, p.head_dim, p.seqlen_q, p.heads, p.batch, p.q_stride.row, p.q_stride.head, p.q_stride.batch},
      {p.k, p.dtype, p.head_dim, p.seqlen_k, p.heads_k, p.batch, p.k_stride.row, p.k_stride.head, p.k_stride.batch},
      {p.v, p.dtype, p.head_dim_v, p.seqlen_k, p.heads_k, p.batch, p.v_stride.row, p.v_stride.head, p.v_stride.batch},
      {p.dout, p.dtype, p.head_dim_v, p.seqlen_q, p.heads, p.batch, p.dout_stride.row, p.dout_stride.head,
       p.dout_stride.batch},
      {p.dk, p.dtype, p.head_dim, p.seqlen_k, p.heads_k, p.batch, p.dk_stride.row, p.dk_stride.head,
       p.dk_stride.batch},
      {p.dv, p.dtype, p.head_dim_v, p.seqlen_k, p.heads_k, p.batch, p.dv_stride.row, p.dv_stride.head,
       p.dv_stride.batch}};
  const char* names[6] = {"q", "k", "v", "dout", "dk", "dv"};
  for (int i = 0; i < 6; ++i)
    if (std::string why = tensor_map_problem(views[i]); !why.empty()) return std::string(names[i]) + " has " + why;
  return {};
}

template <typename T>
std::string name_for(int head_dim) {
  switch (head_dim) {
#if FLASHATTN_CUDA_SM90_HDIM_64
    case 64: return bwd_kernel_name<64, T>();
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    case 128: return bwd_kernel_name<128, T>();
#endif
    default: break;
  }
  throw Unsupported("flashattn: internal error: no sm90 backward for head dim " + std::to_string(head_dim));
}

template <typename T>
void run_head_dim(const BwdParams& p, int head_dim, int device, cudaStream_t stream) {
  switch (head_dim) {
#if FLASHATTN_CUDA_SM90_HDIM_64
    case 64: return run_bwd<64, T>(p, device, stream);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    case 128: return run_bwd<128, T>(p, device, stream);
#endif
    default: break;
  }
  throw Unsupported("flashattn: internal error: no sm90 backward for head dim " + std::to_string(head_dim));
}

}  // namespace

BwdSelection select_bwd(const BwdParams& p, int device) {
  BwdSelection s;
  const Force force = forced();
  if (force == Force::kSm80) {
    s.why_not = "FLASHATTN_CUDA_BACKWARD=sm80";
    return s;
  }
  s.why_not = coverage_problem(p, device, &s.head_dim);
  if (!s.why_not.empty()) {
    if (force == Force::kSm90)
      throw Unsupported("flashattn: FLASHATTN_CUDA_BACKWARD=sm90, but the sm90 backward does not cover this call: " +
                        s.why_not);
    return s;
  }
  s.use = true;
  s.kernel = p.dtype == DType::bf16 ? name_for<__nv_bfloat16>(s.head_dim) : name_for<__half>(s.head_dim);
  return s;
}

void run(const BwdParams& p, const BwdSelection& s, int device, cudaStream_t stream) {
  if (p.dtype == DType::bf16)
    run_head_dim<__nv_bfloat16>(p, s.head_dim, device, stream);
  else
    run_head_dim<__half>(p, s.head_dim, device, stream);
}

}  // namespace flashattn::cuda::sm90
