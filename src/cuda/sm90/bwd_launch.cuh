// Launches the sm90 backward for one (head dim, dtype) instantiation: the fp32 workspace (shared
// layout with the sm80 backward), the preprocess, the main kernel with its tensor maps, the
// postprocess. Included only by the generated translation units under src/cuda/inst/.
#pragma once

#include <atomic>
#include <cstdio>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/common/stream_workspace.h"
#include "cuda/common/bwd_prepost.cuh"
#include "cuda/sm90/bwd_kernel.cuh"
#include "cuda/sm90/bwd_launch.h"
#include "cuda/sm90/tensor_map.h"

namespace flashattn::cuda::sm90 {

template <typename Tr>
std::string bwd_traits_name() {
  char buf[160];
  std::snprintf(buf, sizeof buf, "flash_bwd_sm90<hdim %d, %s, %dx%d, %d+1 warpgroups, %d stages>", Tr::kHeadDim,
                std::is_same_v<typename Tr::Element, __half> ? "fp16" : "bf16", Tr::kBlockM, Tr::kBlockN,
                Tr::kConsumerWGs, Tr::kStages);
  return buf;
}

template <int kHeadDim, typename T>
std::string bwd_kernel_name() {
  return bwd_traits_name<BwdTraits<kHeadDim, T>>();
}

template <typename Tr, bool kScoreMod>
void launch_main(const BwdKernelParams& kp, int64_t blocks, int device, cudaStream_t stream) {
  static const std::string name = bwd_traits_name<Tr>() + (kScoreMod ? " (softcap/alibi)" : "");
  auto kernel = flash_bwd_sm90_kernel<Tr, kScoreMod>;
  // Opting in to more than 48 KB of dynamic smem is per device; do it once for each.
  static std::atomic<uint64_t> smem_ready{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(smem_ready.load(std::memory_order_acquire) & bit)) {
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    smem_ready.fetch_or(bit, std::memory_order_release);
  }
  kernel<<<dim3(unsigned(blocks)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(kp);
  FA_CHECK_LAUNCH(name.c_str());
}

template <int kHeadDim, typename T>
void run_bwd(const BwdParams& p, int device, cudaStream_t stream) {
  using Tr = BwdTraits<kHeadDim, T>;
  constexpr float kLog2e = 1.4426950408889634f;

  BwdKernelParams kp{};
  kp.p = p;
  kp.args = BwdArgs::plan(p, Tr::kBlockM, Tr::kBlockN, kLog2e);
  kp.mask = Mask32::make(p.seqlen_q, p.seqlen_k, p.window_left, p.window_right);
  const int64_t main_blocks = int64_t(kp.args.n_blocks) * p.heads_k * p.batch;
  const int64_t row_blocks = int64_t(kp.args.m_blocks) * p.heads * p.batch;

  auto view = [&](const void* data, int cols, int64_t rows, int heads, const Strides& s) {
    return TensorView4d{data, p.dtype, cols, rows, heads, p.batch, s.row, s.head, s.batch};
  };
  kp.tma_q = make_tensor_map(view(p.q, p.head_dim, p.seqlen_q, p.heads, p.q_stride), 64, Tr::kBlockM, "q");
  kp.tma_do = make_tensor_map(view(p.dout, p.head_dim_v, p.seqlen_q, p.heads, p.dout_stride), 64, Tr::kBlockM, "dout");
  kp.tma_k = make_tensor_map(view(p.k, p.head_dim, p.seqlen_k, p.heads_k, p.k_stride), 64, Tr::kBlockN, "k");
  kp.tma_v = make_tensor_map(view(p.v, p.head_dim_v, p.seqlen_k, p.heads_k, p.v_stride), 64, Tr::kBlockN, "v");
  kp.tma_dk = make_tensor_map(view(p.dk, p.head_dim, p.seqlen_k, p.heads_k, p.dk_stride), 64, 64, "dk");
  kp.tma_dv = make_tensor_map(view(p.dv, p.head_dim_v, p.seqlen_k, p.heads_k, p.dv_stride), 64, 64, "dv");

  StreamWorkspace ws(kp.args.workspace_bytes(p, Tr::kHeadDim), stream);
  kp.args.carve(p, Tr::kHeadDim, ws.data());

  if (row_blocks > 0) {
    flash_bwd_preprocess_kernel<Tr><<<dim3(unsigned(row_blocks)), dim3(Tr::kBlockM * 4), 0, stream>>>(p, kp.args);
    FA_CHECK_LAUNCH("flash_bwd_preprocess (sm90 tiles)");
  }
  if (kp.args.dq_semaphore)
    FA_CUDA_CHECK(cudaMemsetAsync(kp.args.dq_semaphore, 0, kp.args.semaphore_bytes(p), stream));
  if (main_blocks > 0) {
    if (p.softcap > 0 || p.alibi_slopes)
      launch_main<Tr, true>(kp, main_blocks, device, stream);
    else
      launch_main<Tr, false>(kp, main_blocks, device, stream);
  }
  if (row_blocks > 0) {
    flash_bwd_postprocess_kernel<Tr><<<dim3(unsigned(row_blocks)), dim3(Tr::kBlockM * 4), 0, stream>>>(p, kp.args);
    FA_CHECK_LAUNCH("flash_bwd_postprocess (sm90 tiles)");
  }
}

}  // namespace flashattn::cuda::sm90
