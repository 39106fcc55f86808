#include "cuda/sm90/dispatch.h"

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <string>
#include <utility>

#include "core/knobs.h"
#include "cuda/common/check.h"
#include "cuda/common/kernel_table.h"
#include "cuda/inst/kernel_table.h"
#include "cuda/sm90/bwd_launch.h"
#include "cuda/sm90/tensor_map.h"
#include "cuda/sm90/tile_size.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm90 {
namespace {

// The generated table's sm90 families: launcher and name of each (head dim, dtype).
struct FwdKernel {
  void (*run)(const AttnParams&, const FwdPlan&, int, cudaStream_t);
  std::string (*name)(const FwdPlan&);
};
struct BwdKernel {
  void (*run)(const BwdParams&, int, cudaStream_t);
  std::string (*name)();
};
#define LAUNCH(hdim, T) (FwdKernel{&run_fwd<hdim, T>, &kernel_name<hdim, T>})
constexpr KernelEntry<FwdKernel> kForward[] = {FLASHATTN_FWD_SM90_KERNELS(FLASHATTN_KERNEL_ENTRY){}};
#undef LAUNCH
#define LAUNCH(hdim, T) (BwdKernel{&run_bwd<hdim, T>, &bwd_kernel_name<hdim, T>})
constexpr KernelEntry<BwdKernel> kBackward[] = {FLASHATTN_BWD_SM90_KERNELS(FLASHATTN_KERNEL_ENTRY){}};
#undef LAUNCH

// Masked calls up to this many query rows take the narrow tile (FLASHATTN_SM90_NARROW forces
// either).
constexpr int64_t kNarrowMaxSeqlenQ = 2048;

// The one coverage check of both directions: empty when the sm90 kernels cover the call,
// otherwise the first reason they do not. `views` are the tensors the kernel maps with TMA.
template <typename Kernel, int N>
std::string coverage_problem(const AttnParams& p, int device, const KernelEntry<Kernel> (&table)[N],
                             std::initializer_list<std::pair<const char*, TensorView4d>> views, int* head_dim) {
  int major = 0, minor = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0)
    return "the device is sm_" + std::to_string(major) + std::to_string(minor) + " (sm90a code runs on sm_90 only)";
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) return "dtype is not fp16 or bf16";
  if (p.page_table || p.kv_batch_idx || p.k_leftpad || p.seqused_q)
    return "KV-cache addressing (a page table, cache rows, left padding) or seqused_q is not covered yet (sm80 "
           "serves it)";
  const int need = std::max(p.head_dim, p.head_dim_v);
  const KernelEntry<Kernel>* e = find_kernel(table, need, p.dtype);
  if (!e) return "no sm90 instantiation for head dim " + std::to_string(need) + " in this build";
  *head_dim = e->head_dim;
  if (p.seqlen_q == 0 || p.seqlen_k == 0) return "an empty sequence (no tensor map for zero rows)";
  if (p.seqlen_q + p.seqlen_k >= (int64_t(1) << 30)) return "seqlen_q + seqlen_k >= 2^30 (the kernel's key bounds are int)";
  for (const auto& [name, view] : views)
    if (std::string why = tensor_map_problem(view); !why.empty()) return std::string(name) + " has " + why;
  return {};
}

TensorView4d q_view(const void* data, const AttnParams& p, int cols, const Strides& s) {
  return {data, p.dtype, cols, p.seqlen_q, p.heads, p.batch, s.row, s.head, s.batch};
}
TensorView4d k_view(const void* data, const AttnParams& p, int cols, const Strides& s) {
  return {data, p.dtype, cols, p.seqlen_k, p.heads_k, p.batch, s.row, s.head, s.batch};
}

// Applies the knob: sm80 never selects; sm90 turns a coverage gap into an error.
void apply_choice(KernelChoice choice, const char* knob, const char* direction, Selection& s) {
  if (s.why_not.empty()) {
    s.use = true;
    return;
  }
  if (choice == KernelChoice::kSm90)
    throw Unsupported(std::string("flashattn: ") + knob + "=sm90, but the sm90 " + direction +
                      " does not cover this call: " + s.why_not);
}

}  // namespace

Selection select(const AttnParams& p, int device) {
  Selection s;
  const Knobs& k = knobs();
  if (k.cuda_forward == KernelChoice::kSm80) {
    s.why_not = "FLASHATTN_CUDA_FORWARD=sm80";
    return s;
  }
  if (!(p.scale > 0)) s.why_not = "a softmax scale <= 0 (the max of the scaled scores is taken on the raw ones)";
  else if (p.num_splits > 1) s.why_not = "split-KV was asked for";
  else if (p.cu_seqlens_q || p.cu_seqlens_k || p.seqused_k) s.why_not = "varlen batches are not covered yet";
  else
    s.why_not = coverage_problem(p, device, kForward,
                                 {{"q", q_view(p.q, p, p.head_dim, p.q_stride)},
                                  {"k", k_view(p.k, p, p.head_dim, p.k_stride)},
                                  {"v", k_view(p.v, p, p.head_dim_v, p.v_stride)},
                                  {"out", q_view(p.out, p, p.head_dim_v, p.out_stride)}},
                                 &s.head_dim);
  if (s.why_not.empty()) {
    const int block_m = std::min(fwd_tile(s.head_dim).block_m, fwd_tile(s.head_dim, true).block_m);
    if ((p.seqlen_q + block_m - 1) / block_m * p.heads * p.batch > INT_MAX) s.why_not = "more than 2^31 - 1 query blocks";
  }
  apply_choice(k.cuda_forward, "FLASHATTN_CUDA_FORWARD", "forward", s);
  if (!s.use) return s;

  s.plan.score_mod = p.softcap > 0 || p.alibi_slopes;
  s.plan.schedule = k.sm90_pingpong && !s.plan.score_mod ? Schedule::kPingPong : Schedule::kOverlap;
  const bool masked = p.window_left >= 0 || p.window_right >= 0;
  // Masked calls with short query sequences take the narrow tile (tile_size.h: less of the computed
  // triangle is masked); long ones keep the wide tile, which reloads K/V for fewer query rows.
  s.plan.narrow = k.sm90_narrow == Override::kAuto ? masked && p.seqlen_q <= kNarrowMaxSeqlenQ
                                                    : k.sm90_narrow == Override::kOn;
  // The persistent grid walks the tiles in static zig-zag rounds. Under a causal mask or a window
  // the tiles of one head differ in cost up to m_blocks : 1, and with more than 32 query blocks per
  // head the CTAs drifted apart (imbalance, K/V of many heads in L2): one CTA per tile, which the
  // hardware hands out heavy-first, was faster there on the H100 (bench/gpu/HOPPER_NOTES.md, v3).
  const int block_m = fwd_tile(s.head_dim, s.plan.narrow).block_m;
  const int64_t m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  s.plan.persistent = k.sm90_persistent == Override::kAuto ? !(masked && m_blocks > 32)
                                                           : k.sm90_persistent == Override::kOn;
  s.plan.max_ctas = k.sm90_max_ctas;
  return s;
}

BwdSelection select_bwd(const BwdParams& p, int device) {
  BwdSelection s;
  const Knobs& k = knobs();
  if (k.cuda_backward == KernelChoice::kSm80) {
    s.why_not = "FLASHATTN_CUDA_BACKWARD=sm80";
    return s;
  }
  if (p.cu_seqlens_q || p.cu_seqlens_k || p.seqused_k)
    s.why_not = "varlen batches are not covered yet";
  else
    s.why_not = coverage_problem(p, device, kBackward,
                                 {{"q", q_view(p.q, p, p.head_dim, p.q_stride)},
                                  {"k", k_view(p.k, p, p.head_dim, p.k_stride)},
                                  {"v", k_view(p.v, p, p.head_dim_v, p.v_stride)},
                                  {"dout", q_view(p.dout, p, p.head_dim_v, p.dout_stride)},
                                  {"dk", k_view(p.dk, p, p.head_dim, p.dk_stride)},
                                  {"dv", k_view(p.dv, p, p.head_dim_v, p.dv_stride)}},
                                 &s.head_dim);
  apply_choice(k.cuda_backward, "FLASHATTN_CUDA_BACKWARD", "backward", s);
  return s;
}

void run(const AttnParams& p, const Selection& s, int device, cudaStream_t stream) {
  find_kernel(kForward, s.head_dim, p.dtype)->launch.run(p, s.plan, device, stream);
}
void run(const BwdParams& p, const BwdSelection& s, int device, cudaStream_t stream) {
  find_kernel(kBackward, s.head_dim, p.dtype)->launch.run(p, device, stream);
}

std::string kernel_name(const AttnParams& p, const Selection& s) {
  return find_kernel(kForward, s.head_dim, p.dtype)->launch.name(s.plan);
}
std::string kernel_name(const BwdParams& p, const BwdSelection& s) {
  return find_kernel(kBackward, s.head_dim, p.dtype)->launch.name();
}

}  // namespace flashattn::cuda::sm90
