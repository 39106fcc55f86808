// Launches the sm80 forward kernel for one (head dim, dtype) instantiation. Included only by
// the generated translation units under src/cuda/inst/.
#pragma once

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/sm80/fwd_kernel.cuh"
#include "cuda/sm80/launch.h"
#include "flashattn/error.h"

namespace flashattn::cuda::sm80 {

template <typename T>
constexpr const char* element_name() {
  return std::is_same_v<T, __half> ? "fp16" : "bf16";
}

template <typename Tr, bool kScoreMod>
void launch_fwd(const AttnParams& p, const FwdArgs& args, int64_t blocks, int device, cudaStream_t stream) {
  static const std::string name = [] {
    char buf[160];
    std::snprintf(buf, sizeof buf, "flash_fwd_sm80<hdim %d, %s, %dx%d, %d warps%s>", Tr::kHeadDim,
                  element_name<typename Tr::Element>(), Tr::kBlockM, Tr::kBlockN, Tr::kWarps,
                  kScoreMod ? ", softcap/alibi" : "");
    return std::string(buf);
  }();
  auto kernel = flash_fwd_kernel<Tr, kScoreMod>;
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
  kernel<<<dim3(unsigned(blocks)), dim3(Tr::kThreads), Tr::kSmemBytes, stream>>>(p, args);
  FA_CHECK_LAUNCH(name.c_str());
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
  if (p.softcap > 0 || p.alibi_slopes)
    launch_fwd<Tr, true>(p, args, blocks, device, stream);
  else
    launch_fwd<Tr, false>(p, args, blocks, device, stream);
}

template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, int device, cudaStream_t stream) {
  using Small = FwdTraits<kHeadDim, T, false>;
  if constexpr (fwd_tile(kHeadDim, true) != fwd_tile(kHeadDim, false)) {
    using Large = FwdTraits<kHeadDim, T, true>;
    // FLASHATTN_CUDA_SMALL_TILES=1 forces the sm80 tiles (lets an sm90 test run them too).
    const char* force_small = std::getenv("FLASHATTN_CUDA_SMALL_TILES");
    if (!(force_small && force_small[0] == '1') && max_smem_per_block(device) >= Large::kSmemBytes)
      return run_fwd_tile<Large>(p, device, stream);
  }
  run_fwd_tile<Small>(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
