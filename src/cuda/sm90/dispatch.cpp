#include "cuda/sm90/dispatch.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/common/check.h"
#include "cuda/sm90/tensor_map.h"
#include "cuda/sm90/tile_size.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm90 {
namespace {

// The head dims this build instantiated for sm90 (FLASHATTN_CUDA_HEAD_DIMS intersected with the
// Hopper set, see src/cuda/CMakeLists.txt), ascending; smaller head dims pad up to them.
constexpr int kHeadDims[] = {
#if FLASHATTN_CUDA_SM90_HDIM_64
    64,
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    128,
#endif
#if FLASHATTN_CUDA_SM90_HDIM_192
    192,
#endif
#if FLASHATTN_CUDA_SM90_HDIM_256
    256,
#endif
    0};  // sentinel

// Masked calls up to this many query rows take the narrow tile (FLASHATTN_SM90_NARROW=0/1 forces
// either, auto or unset: this rule).
constexpr int64_t kNarrowMaxSeqlenQ = 2048;

enum class Force { kAuto, kSm80, kSm90 };

Force forced() {
  const char* v = std::getenv("FLASHATTN_CUDA_FORWARD");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return Force::kAuto;
  if (std::strcmp(v, "sm80") == 0) return Force::kSm80;
  if (std::strcmp(v, "sm90") == 0) return Force::kSm90;
  throw Unsupported(std::string("flashattn: FLASHATTN_CUDA_FORWARD=") + v + ": expected auto, sm80 or sm90");
}

Schedule schedule_from_env() {
  const char* v = std::getenv("FLASHATTN_SM90_SCHEDULE");
  if (!v || !*v || std::strcmp(v, "overlap") == 0) return Schedule::kOverlap;
  if (std::strcmp(v, "pingpong") == 0) return Schedule::kPingPong;
  if (std::strcmp(v, "serial") == 0) return Schedule::kSerial;
  throw Unsupported(std::string("flashattn: FLASHATTN_SM90_SCHEDULE=") + v + ": expected serial, overlap or pingpong");
}

// Empty when the sm90 kernel covers the call; otherwise the first reason it does not.
std::string coverage_problem(const AttnParams& p, int device, int* head_dim) {
  int major = 0, minor = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0)
    return "the device is sm_" + std::to_string(major) + std::to_string(minor) + " (sm90a code runs on sm_90 only)";
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) return "dtype is not fp16 or bf16";
  if (p.cu_seqlens_q || p.cu_seqlens_k) return "varlen batches are not covered yet";
  if (p.softcap > 0) return "softcap is not covered yet";
  if (p.alibi_slopes) return "ALiBi is not covered yet";
  if (!(p.scale > 0)) return "a softmax scale <= 0 (the max of the scaled scores is taken on the raw ones)";
  if (p.num_splits > 1) return "split-KV was asked for";
  const int need = std::max(p.head_dim, p.head_dim_v);
  *head_dim = 0;
  for (int d : kHeadDims)
    if (d >= need) {
      *head_dim = d;
      break;
    }
  if (!*head_dim) return "no sm90 instantiation for head dim " + std::to_string(need) + " in this build";
  if (p.seqlen_q + p.seqlen_k >= (int64_t(1) << 30)) return "seqlen_q + seqlen_k >= 2^30 (the kernel's key bounds are int)";
  const int block_m = std::min(fwd_tile(*head_dim).block_m, fwd_tile(*head_dim, true).block_m);
  if ((p.seqlen_q + block_m - 1) / block_m * p.heads * p.batch > INT_MAX) return "more than 2^31 - 1 query blocks";
  const TensorView4d views[4] = {
      {p.q, p.dtype, p.head_dim, p.seqlen_q, p.heads, p.batch, p.q_stride.row, p.q_stride.head, p.q_stride.batch},
      {p.k, p.dtype, p.head_dim, p.seqlen_k, p.heads_k, p.batch, p.k_stride.row, p.k_stride.head, p.k_stride.batch},
      {p.v, p.dtype, p.head_dim_v, p.seqlen_k, p.heads_k, p.batch, p.v_stride.row, p.v_stride.head, p.v_stride.batch},
      {p.out, p.dtype, p.head_dim_v, p.seqlen_q, p.heads, p.batch, p.out_stride.row, p.out_stride.head,
       p.out_stride.batch}};
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i)
    if (std::string why = tensor_map_problem(views[i]); !why.empty()) return std::string(names[i]) + " has " + why;
  return {};
}

template <typename T>
std::string name_for(int head_dim, const FwdPlan& plan) {
  switch (head_dim) {
#if FLASHATTN_CUDA_SM90_HDIM_64
    case 64: return kernel_name<64, T>(plan);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    case 128: return kernel_name<128, T>(plan);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_192
    case 192: return kernel_name<192, T>(plan);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_256
    case 256: return kernel_name<256, T>(plan);
#endif
    default: break;
  }
  throw Unsupported("flashattn: internal error: no sm90 forward for head dim " + std::to_string(head_dim));
}

template <typename T>
void run_head_dim(const AttnParams& p, const Selection& s, int device, cudaStream_t stream) {
  switch (s.head_dim) {
#if FLASHATTN_CUDA_SM90_HDIM_64
    case 64: return run_fwd<64, T>(p, s.plan, device, stream);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_128
    case 128: return run_fwd<128, T>(p, s.plan, device, stream);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_192
    case 192: return run_fwd<192, T>(p, s.plan, device, stream);
#endif
#if FLASHATTN_CUDA_SM90_HDIM_256
    case 256: return run_fwd<256, T>(p, s.plan, device, stream);
#endif
    default: break;
  }
  throw Unsupported("flashattn: internal error: no sm90 forward for head dim " + std::to_string(s.head_dim));
}

}  // namespace

Selection select(const AttnParams& p, int device) {
  Selection s;
  const Force force = forced();
  if (force == Force::kSm80) {
    s.why_not = "FLASHATTN_CUDA_FORWARD=sm80";
    return s;
  }
  s.why_not = coverage_problem(p, device, &s.head_dim);
  if (!s.why_not.empty()) {
    if (force == Force::kSm90)
      throw Unsupported("flashattn: FLASHATTN_CUDA_FORWARD=sm90, but the sm90 forward does not cover this call: " +
                        s.why_not);
    return s;
  }
  s.use = true;
  s.plan.schedule = schedule_from_env();
  const bool masked = p.window_left >= 0 || p.window_right >= 0;
  // Masked calls with short query sequences take the narrow tile (tile_size.h: less of the computed
  // triangle is masked); long ones keep the wide tile, which reloads K/V for fewer query rows.
  s.plan.narrow = masked && p.seqlen_q <= kNarrowMaxSeqlenQ;
  if (const char* narrow = std::getenv("FLASHATTN_SM90_NARROW"); narrow && *narrow && std::strcmp(narrow, "auto") != 0)
    s.plan.narrow = std::strcmp(narrow, "0") != 0;
  // The persistent grid walks the tiles in static zig-zag rounds. Under a causal mask or a window
  // the tiles of one head differ in cost up to m_blocks : 1, and with more than 32 query blocks per
  // head the CTAs drifted apart (imbalance, K/V of many heads in L2): one CTA per tile, which the
  // hardware hands out heavy-first, was faster there on the H100 (bench/gpu/HOPPER_NOTES.md, v3).
  const int block_m = fwd_tile(s.head_dim, s.plan.narrow).block_m;
  const int64_t m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  s.plan.persistent = !(masked && m_blocks > 32);
  if (const char* persistent = std::getenv("FLASHATTN_SM90_PERSISTENT"); persistent && *persistent)
    s.plan.persistent = std::strcmp(persistent, "0") != 0;
  if (const char* max_ctas = std::getenv("FLASHATTN_SM90_MAX_CTAS")) s.plan.max_ctas = std::atoi(max_ctas);
  s.kernel = p.dtype == DType::bf16 ? name_for<__nv_bfloat16>(s.head_dim, s.plan) : name_for<__half>(s.head_dim, s.plan);
  return s;
}

void run(const AttnParams& p, const Selection& s, int device, cudaStream_t stream) {
  if (p.dtype == DType::bf16)
    run_head_dim<__nv_bfloat16>(p, s, device, stream);
  else
    run_head_dim<__half>(p, s, device, stream);
}

}  // namespace flashattn::cuda::sm90
