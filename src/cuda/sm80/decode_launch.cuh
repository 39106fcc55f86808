// Launches the sm80 decode kernel for one (head dim, dtype) instantiation, split-KV included.
// Included only by the generated translation units under src/cuda/inst/.
#pragma once

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
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

template <typename Tr, bool kScoreMod, int kPrefetch = Tr::kPrefetchBytes>
struct DecodeKernel {
  static constexpr auto kernel = flash_decode_kernel<Tr, kScoreMod, kPrefetch>;

  static const std::string& name() {
    static const std::string n = [] {
      char buf[160];
      std::snprintf(buf, sizeof buf, "flash_decode_sm80<hdim %d, %s, %d warps, %d stages, L2 fetch %d%s>",
                    Tr::kHeadDim, std::is_same_v<typename Tr::Element, __half> ? "fp16" : "bf16", Tr::kWarps,
                    Tr::kStages, kPrefetch, kScoreMod ? ", softcap/alibi" : "");
      return std::string(buf);
    }();
    return n;
  }

  // Opts in to the kernel's dynamic smem on `device` (once) and returns how many CTAs of it an SM holds.
  static int prepare(int device) {
    static std::atomic<int> ctas_per_sm[64] = {};
    if (device >= 0 && device < 64)
      if (const int n = ctas_per_sm[device].load(std::memory_order_acquire)) return n;
    if (Tr::kSmemBytes > max_smem_per_block(device))
      throw Unsupported("flashattn: " + name() + " needs " + std::to_string(Tr::kSmemBytes) +
                        " bytes of shared memory per block; cuda:" + std::to_string(device) + " offers " +
                        std::to_string(max_smem_per_block(device)));
    FA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    int n = 0;
    FA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Tr::kThreads, Tr::kSmemBytes));
    n = n > 0 ? n : 1;
    if (device >= 0 && device < 64) ctas_per_sm[device].store(n, std::memory_order_release);
    return n;
  }

  static void run(const AttnParams& p, int device, cudaStream_t stream) {
    const int ctas_per_sm = prepare(device);
    DecodeArgs args;
    args.group = p.heads / p.heads_k;
    const int64_t row_blocks = (p.seqlen_q * args.group + Tr::kBlockM - 1) / Tr::kBlockM;
    const int64_t ctas = row_blocks * p.heads_k * p.batch;
    if (ctas == 0) return;
    args.row_blocks = int(row_blocks);
    args.scale_log2 = p.scale * decode_detail::kLog2e;
    const SplitPlan plan = plan_splits(p, ctas, int64_t(sm_count(device)) * ctas_per_sm, Tr::kKeysPerRound,
                                       kDecodeMinKeysPerSplit<Tr>);
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
  if (p.softcap > 0 || p.alibi_slopes) return DecodeKernel<Tr, true>::run(p, device, stream);
  // EXPERIMENT (to be settled by the next device run): FLASHATTN_CUDA_DECODE_L2_FETCH=0 drops the
  // L2 fetch-size hint of the K/V copies.
  const char* fetch = std::getenv("FLASHATTN_CUDA_DECODE_L2_FETCH");
  if (fetch && fetch[0] == '0') return DecodeKernel<Tr, false, 0>::run(p, device, stream);
  DecodeKernel<Tr, false>::run(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
