// Launches the sm80 forward kernel for one (head dim, dtype) instantiation. Included only by
// the generated translation units under src/cuda/inst/.
#pragma once

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "core/knobs.h"
#include "cuda/common/check.h"
#include "cuda/sm80/fwd_kernel.cuh"
#include "cuda/sm80/launch.h"
#include "cuda/split_kv.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm80 {

template <typename T>
constexpr const char* element_name() {
  return std::is_same_v<T, __half> ? "fp16" : "bf16";
}

template <typename Tr, bool kScoreMod, bool kSplit, bool kPaged>
void launch_fwd(const AttnParams& p, const FwdArgs& args, const FwdSplitArgs& split_args, int64_t blocks, int device,
                cudaStream_t stream) {
  static const std::string name = [] {
    char buf[176];
    std::snprintf(buf, sizeof buf, "flash_fwd_sm80<hdim %d, %s, %dx%d, %d warps%s%s%s>", Tr::kHeadDim,
                  element_name<typename Tr::Element>(), Tr::kBlockM, Tr::kBlockN, Tr::kWarps,
                  kScoreMod ? ", softcap/alibi" : "", kSplit ? ", split-KV" : "", kPaged ? ", paged" : "");
    return std::string(buf);
  }();
  auto kernel = flash_fwd_kernel<Tr, kScoreMod, kSplit, kPaged>;
  // Opting in to more than 48 KB of dynamic smem is per device; do it once for each.
  static std::atomic<uint64_t> smem_ready{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(smem_ready.load(std::memory_order_acquire) & bit)) {
    if (Tr::kSmemBytes > max_smem_per_block(device))
      throw Unsupported("flashattn: " + name + " needs " + std::to_string(Tr::kSmemBytes) +
                        " bytes of shared memory per block; cuda:" + std::to_string(device) + " offers " +
                        std::to_string(max_smem_per_block(device)));
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    smem_ready.fetch_or(bit, std::memory_order_release);
  }
  kernel<<<dim3(unsigned(blocks)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(p, args, split_args);
  FA_CHECK_LAUNCH(name.c_str());
}

template <typename Tr, bool kSplit>
void launch_fwd_mod(const AttnParams& p, const FwdArgs& args, const FwdSplitArgs& split_args, int64_t blocks,
                    int device, cudaStream_t stream) {
  const bool mod = p.softcap > 0 || p.alibi_slopes;
  if (p.page_table)
    mod ? launch_fwd<Tr, true, kSplit, true>(p, args, split_args, blocks, device, stream)
        : launch_fwd<Tr, false, kSplit, true>(p, args, split_args, blocks, device, stream);
  else
    mod ? launch_fwd<Tr, true, kSplit, false>(p, args, split_args, blocks, device, stream)
        : launch_fwd<Tr, false, kSplit, false>(p, args, split_args, blocks, device, stream);
}

// Resident CTAs per SM of the main kernel: its smem and 255-register threads allow at most this
// many (the heuristic needs only the order of magnitude).
template <typename Tr>
int fwd_ctas_per_sm(int device) {
  static std::atomic<int> cached[64] = {};
  if (device >= 0 && device < 64)
    if (const int n = cached[device].load(std::memory_order_relaxed)) return n;
  int smem_per_sm = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  const int by_smem = smem_per_sm / (Tr::kSmemBytes + 1024);  // 1 KB reserved per CTA
  const int by_regs = 65536 / (Tr::kThreads * 256);
  int n = by_smem < by_regs ? by_smem : by_regs;
  n = n > 0 ? n : 1;
  if (device >= 0 && device < 64) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

template <typename Tr>
void run_fwd_tile(const AttnParams& p, int device, cudaStream_t stream) {
  FwdArgs args;
  args.group = p.heads / p.heads_k;
  const int64_t m_blocks = (p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const int64_t blocks = m_blocks * p.heads * p.batch;
  if (blocks == 0) return;
  if (blocks > INT_MAX)
    throw Unsupported("flashattn: CUDA forward: " + std::to_string(blocks) +
                      " query blocks (seqlen_q / " + std::to_string(Tr::kBlockM) +
                      " x heads x batch) exceed the grid limit of 2^31 - 1");
  args.m_blocks = int(m_blocks);
  args.scale_log2 = p.scale * detail::kLog2e;
  // Split-KV when few CTAs would leave SMs idle on long keys (or when the caller asks): each
  // split keeps at least 4 key blocks.
  SplitPlan plan;
  if (p.num_splits != 1)
    plan = plan_splits(p, blocks, int64_t(sm_count(device)) * fwd_ctas_per_sm<Tr>(device), Tr::kBlockN,
                       4 * Tr::kBlockN);
  FwdSplitArgs split_args;
  if (plan.splits <= 1) return launch_fwd_mod<Tr, false>(p, args, split_args, blocks, device, stream);

  if (blocks * plan.splits > INT_MAX)
    throw Unsupported("flashattn: CUDA forward: " + std::to_string(blocks * plan.splits) +
                      " CTAs (query blocks x heads x batch x splits) exceed the grid limit of 2^31 - 1");
  split_args.splits = plan.splits;
  split_args.split_blocks = int(plan.chunk / Tr::kBlockN);
  SplitWorkspace workspace(p, plan.splits, stream);
  split_args.partial = workspace.partial();
  launch_fwd_mod<Tr, true>(p, args, split_args, blocks * plan.splits, device, stream);
  workspace.merge_into(p);
}

template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, int device, cudaStream_t stream) {
  using Small = FwdTraits<kHeadDim, T, false>;
  if constexpr (fwd_tile(kHeadDim, true) != fwd_tile(kHeadDim, false)) {
    using Large = FwdTraits<kHeadDim, T, true>;
    // FLASHATTN_CUDA_SMALL_TILES=1 forces the sm80 tiles (lets an sm90 test run them too).
    if (!knobs().cuda_small_tiles && max_smem_per_block(device) >= Large::kSmemBytes)
      return run_fwd_tile<Large>(p, device, stream);
  }
  run_fwd_tile<Small>(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
