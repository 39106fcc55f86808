// Launches the sm80 decode kernel for one (head dim, dtype) instantiation, split-KV included.
// Included only by the generated translation units under src/cuda/inst/.
#pragma once

#include <atomic>
#include <climits>
#include <cstdio>
#include <string>

#include "cuda/common/check.h"
#include "cuda/sm80/decode_kernel.cuh"
#include "cuda/sm80/launch.h"
#include "cuda/split_kv.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm80 {

// A split gives each warp at least 4 key blocks: below that the partial write and the merge cost
// more than the extra parallelism returns.
template <typename Tr>
constexpr int64_t kDecodeMinKeysPerSplit = 4 * Tr::kKeysPerRound;

template <typename Tr, bool kScoreMod, bool kPaged>
struct DecodeKernel {
  static constexpr auto kernel = flash_decode_kernel<Tr, kScoreMod, kPaged>;

  static const std::string& name() {
    static const std::string n = [] {
      char buf[176];
      std::snprintf(buf, sizeof buf, "flash_decode_sm80<hdim %d, %s, %d warps, %d stages, L2 fetch %d%s%s>",
                    Tr::kHeadDim, std::is_same_v<typename Tr::Element, __half> ? "fp16" : "bf16", Tr::kWarps,
                    Tr::kStages, Tr::kPrefetchBytes, kScoreMod ? ", softcap/alibi" : "", kPaged ? ", paged" : "");
      return std::string(buf);
    }();
    return n;
  }

  // Opts in to the kernel's dynamic smem on `device` (once per device).
  static void prepare(int device) {
    static std::atomic<uint64_t> ready{0};
    const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
    if (bit && (ready.load(std::memory_order_acquire) & bit)) return;
    if (Tr::kSmemBytes > max_smem_per_block(device))
      throw Unsupported("flashattn: " + name() + " needs " + std::to_string(Tr::kSmemBytes) +
                        " bytes of shared memory per block; cuda:" + std::to_string(device) + " offers " +
                        std::to_string(max_smem_per_block(device)));
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    ready.fetch_or(bit, std::memory_order_release);
  }

  static void run(const AttnParams& p, int device, cudaStream_t stream) {
    prepare(device);
    DecodeArgs args;
    args.group = p.heads / p.heads_k;
    const int64_t row_blocks = (p.seqlen_q * args.group + Tr::kBlockM - 1) / Tr::kBlockM;
    const int64_t ctas = row_blocks * p.heads_k * p.batch;
    if (ctas == 0) return;
    args.row_blocks = int(row_blocks);
    args.scale_log2 = p.scale * decode_detail::kLog2e;
    // A wave is one CTA per SM, although two fit: the kernel is bound by the bytes each SM moves,
    // so an SM holding two CTAs finishes last. Measured on H100, b1 x 8 kv heads, 32k keys:
    // 16 splits (128 CTAs) 56 us, 29 (232 CTAs) 59 us, 33 (264) 59 us, 66 (528) 62 us; batch 16
    // (128 CTAs): 1 split 2.87 ms, 2 splits 2.89 ms.
    const SplitPlan plan = plan_splits(p, ctas, sm_count(device), Tr::kKeysPerRound, kDecodeMinKeysPerSplit<Tr>);
    args.splits = plan.splits;
    args.chunk = plan.chunk;
    const int64_t blocks = ctas * plan.splits;
    if (blocks > INT_MAX)
      throw Unsupported("flashattn: CUDA decode forward: " + std::to_string(blocks) +
                        " CTAs (packed query blocks x kv heads x batch x splits) exceed the grid limit of 2^31 - 1");
    if (plan.splits == 1) {
      kernel<<<dim3(unsigned(blocks)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(p, args);
      FA_CHECK_LAUNCH(name().c_str());
      return;
    }
    SplitWorkspace workspace(p, plan.splits, stream);
    args.partial = workspace.partial();
    kernel<<<dim3(unsigned(blocks)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(p, args);
    FA_CHECK_LAUNCH(name().c_str());
    workspace.merge_into(p);
  }
};

template <int kHeadDim, typename T>
void run_decode(const AttnParams& p, int device, cudaStream_t stream) {
  using Tr = DecodeTraits<kHeadDim, T>;
  const bool mod = p.softcap > 0 || p.alibi_slopes;
  if (p.page_table)
    mod ? DecodeKernel<Tr, true, true>::run(p, device, stream) : DecodeKernel<Tr, false, true>::run(p, device, stream);
  else
    mod ? DecodeKernel<Tr, true, false>::run(p, device, stream) : DecodeKernel<Tr, false, false>::run(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
