// Launches the sm90 forward kernel for one (head dim, dtype) instantiation: tensor maps, grid,
// shared memory. Included only by the generated translation units under src/cuda/inst/.
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/sm90/fwd_kernel.cuh"
#include "cuda/sm90/launch.h"
#include "cuda/sm90/tensor_map.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm90 {

template <typename Tr, bool kScoreMod>
std::string traits_name(bool persistent) {
  char buf[224];
  std::snprintf(buf, sizeof buf, "flash_fwd_sm90<hdim %d, %s, %dx%d, %d+1 warpgroups, %d stages, %s, %s%s%s>",
                Tr::kHeadDim, std::is_same_v<typename Tr::Element, __half> ? "fp16" : "bf16", Tr::kBlockM,
                Tr::kBlockN, Tr::kConsumerWGs, Tr::kStages, schedule_name(Tr::kSchedule),
                persistent ? "persistent" : "one CTA per tile", Tr::kSeparateO ? "" : ", O in Q's smem",
                kScoreMod ? ", softcap/alibi" : "");
  return buf;
}

template <typename Tr, bool kScoreMod>
void launch(const AttnParams& p, bool persistent, int max_ctas, int device, cudaStream_t stream) {
  static const std::string names[2] = {traits_name<Tr, kScoreMod>(false), traits_name<Tr, kScoreMod>(true)};
  const std::string& name = names[persistent];
  const int64_t m_blocks = (p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t blocks = m_blocks * p.heads * p.batch;
  if (blocks == 0) return;
  if (blocks > INT_MAX)
    throw Unsupported("flashattn: " + name + ": " + std::to_string(blocks) + " query blocks exceed the grid limit");

  FwdParams fp{};
  TensorView4d q{p.q, p.dtype, p.head_dim, p.seqlen_q, p.heads, p.batch, p.q_stride.row, p.q_stride.head,
                 p.q_stride.batch};
  TensorView4d k{p.k, p.dtype, p.head_dim, p.seqlen_k, p.heads_k, p.batch, p.k_stride.row, p.k_stride.head,
                 p.k_stride.batch};
  TensorView4d v{p.v, p.dtype, p.head_dim_v, p.seqlen_k, p.heads_k, p.batch, p.v_stride.row, p.v_stride.head,
                 p.v_stride.batch};
  TensorView4d o{p.out, p.dtype, p.head_dim_v, p.seqlen_q, p.heads, p.batch, p.out_stride.row, p.out_stride.head,
                 p.out_stride.batch};
  fp.tma_q = make_tensor_map(q, 64, Tr::kBlockM, "q");
  fp.tma_k = make_tensor_map(k, 64, Tr::kBlockN, "k");
  fp.tma_v = make_tensor_map(v, 64, Tr::kBlockN, "v");
  fp.tma_o = make_tensor_map(o, 64, 64, "out");
  fp.lse = p.lse;
  fp.lse_batch_stride = p.lse_batch_stride;
  fp.lse_head_stride = p.lse_head_stride;
  fp.mask = Mask32::make(p.seqlen_q, p.seqlen_k, p.window_left, p.window_right);
  fp.heads = p.heads;
  fp.group = p.heads / p.heads_k;
  fp.m_blocks = int(m_blocks);
  fp.tiles = int(blocks);
  fp.scale_log2 = p.scale * kLog2e;
  fp.scale = p.scale;
  fp.softcap = p.softcap;
  fp.alibi_slopes = p.alibi_slopes;
  fp.alibi_batch_stride = p.alibi_batch_stride;

  auto kernel = flash_fwd_sm90_kernel<Tr, kScoreMod>;
  // Opting in to more than 48 KB of dynamic smem is per device; do it once for each.
  static std::atomic<uint64_t> smem_ready{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(smem_ready.load(std::memory_order_acquire) & bit)) {
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    smem_ready.fetch_or(bit, std::memory_order_release);
  }
  // Persistent: one CTA per SM (the kernel takes a whole SM's registers), each walking its tiles.
  int sms = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (max_ctas > 0) sms = std::min(sms, max_ctas);
  const int grid = persistent ? int(std::min<int64_t>(blocks, sms)) : int(blocks);
  kernel<<<dim3(unsigned(grid)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(fp);
  FA_CHECK_LAUNCH(name.c_str());
}

// The default is kOverlap: on the H100 ping-pong added nothing to it at 8k and lost 6% under a
// causal mask (bench/gpu/HOPPER_NOTES.md, v0); with the persistent grid it measured +0-11% at d128
// non-causal (v4), so two-warpgroup tiles carry it, selectable (FLASHATTN_SM90_SCHEDULE) until the
// GPU tests have run on it. The narrow tile (tile_size.h) exists only where it differs from the
// default one. Softcap / ALiBi (plan.score_mod) run the kScoreMod kernel of the overlap schedule,
// wide or narrow: fn(traits, std::bool_constant<kScoreMod>).
template <int kHeadDim, typename T, typename Fn>
void with_kernel(const FwdPlan& plan, Fn&& fn) {
  using Wide = FwdTraits<kHeadDim, T, Schedule::kOverlap>;
  using Narrow = FwdTraits<kHeadDim, T, Schedule::kOverlap, true>;
  constexpr bool kHasNarrow = fwd_tile(kHeadDim, true) != fwd_tile(kHeadDim);
  if (plan.score_mod) {
    if constexpr (kHasNarrow)
      if (plan.narrow) return fn(Narrow{}, std::true_type{});
    return fn(Wide{}, std::true_type{});
  }
  if constexpr (kHasNarrow)
    if (plan.narrow) return fn(Narrow{}, std::false_type{});
  if constexpr (fwd_tile(kHeadDim).consumer_wgs == 2)
    if (plan.schedule == Schedule::kPingPong)
      return fn(FwdTraits<kHeadDim, T, Schedule::kPingPong>{}, std::false_type{});
  fn(Wide{}, std::false_type{});
}

template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, const FwdPlan& plan, int device, cudaStream_t stream) {
  with_kernel<kHeadDim, T>(plan, [&](auto tr, auto score_mod) {
    launch<decltype(tr), decltype(score_mod)::value>(p, plan.persistent, plan.max_ctas, device, stream);
  });
}

template <int kHeadDim, typename T>
std::string kernel_name(const FwdPlan& plan) {
  std::string name;
  with_kernel<kHeadDim, T>(plan, [&](auto tr, auto score_mod) {
    name = traits_name<decltype(tr), decltype(score_mod)::value>(plan.persistent);
  });
  return name;
}

}  // namespace flashattn::cuda::sm90
