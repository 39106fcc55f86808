// Launches the sm80 backward for one (head dim, dtype) instantiation: a stream-ordered fp32
// workspace, then preprocess -> main kernel -> postprocess on the caller's stream. Included only by
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
#include "cuda/common/stream_workspace.h"
#include "cuda/sm80/bwd_kernel.cuh"
#include "cuda/sm80/bwd_launch.h"
#include "cuda/common/bwd_prepost.cuh"
#include "flashattn/error.h"

namespace flashattn::cuda::sm80 {

template <typename Tr, bool kScoreMod, bool kDeterministic>
void launch_bwd_main(const BwdParams& p, const BwdArgs& args, int64_t blocks, int device, cudaStream_t stream) {
  static const std::string name = [] {
    char buf[200];
    std::snprintf(buf, sizeof buf, "flash_bwd_sm80<hdim %d, %s, %dx%d, %d warps, %d stages%s%s>", Tr::kHeadDim,
                  std::is_same_v<typename Tr::Element, __half> ? "fp16" : "bf16", Tr::kBlockM, Tr::kBlockN,
                  Tr::kWarps, Tr::kStages, kScoreMod ? ", softcap/alibi" : "", kDeterministic ? ", deterministic" : "");
    return std::string(buf);
  }();
  auto kernel = flash_bwd_kernel<Tr, kScoreMod, kDeterministic>;
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

template <typename Tr, bool kScoreMod>
void launch_bwd_main(const BwdParams& p, const BwdArgs& args, int64_t blocks, int device, cudaStream_t stream) {
  if (p.deterministic)
    launch_bwd_main<Tr, kScoreMod, true>(p, args, blocks, device, stream);
  else
    launch_bwd_main<Tr, kScoreMod, false>(p, args, blocks, device, stream);
}

template <typename Tr>
void run_bwd_tile(const BwdParams& p, int device, cudaStream_t stream) {
  constexpr int kBlockM = Tr::kBlockM;
  BwdArgs args = BwdArgs::plan(p, kBlockM, Tr::kBlockN, detail::kLog2e);
  const int64_t main_blocks = int64_t(args.n_blocks) * p.heads_k * p.batch;
  const int64_t row_blocks = int64_t(args.m_blocks) * p.heads * p.batch;
  StreamWorkspace ws(args.workspace_bytes(p, Tr::kHeadDim), stream);
  args.carve(p, Tr::kHeadDim, ws.data());
  if (args.dq_semaphore)
    FA_CUDA_CHECK(cudaMemsetAsync(args.dq_semaphore, 0, args.semaphore_bytes(p), stream));

  if (row_blocks > 0) {
    flash_bwd_preprocess_kernel<Tr><<<dim3(unsigned(row_blocks)), dim3(kBlockM * 4), 0, stream>>>(p, args);
    FA_CHECK_LAUNCH("flash_bwd_preprocess_sm80");
  }
  if (main_blocks > 0) {
    if (p.softcap > 0 || p.alibi_slopes)
      launch_bwd_main<Tr, true>(p, args, main_blocks, device, stream);
    else
      launch_bwd_main<Tr, false>(p, args, main_blocks, device, stream);
  }
  if (row_blocks > 0) {
    flash_bwd_postprocess_kernel<Tr><<<dim3(unsigned(row_blocks)), dim3(kBlockM * 4), 0, stream>>>(p, args);
    FA_CHECK_LAUNCH("flash_bwd_postprocess_sm80");
  }
}

template <int kHeadDim, typename T>
void run_bwd(const BwdParams& p, int device, cudaStream_t stream) {
  using Small = BwdTraits<kHeadDim, T, bwd_tile(kHeadDim, false)>;
  static_assert(Small::kSmemBytes <= kBwdSmallSmemBytes, "the sm80 tile must fit A100's shared memory");
  if constexpr (bwd_tile(kHeadDim, true) != bwd_tile(kHeadDim, false)) {
    using Large = BwdTraits<kHeadDim, T, bwd_tile(kHeadDim, true)>;
    // FLASHATTN_CUDA_SMALL_TILES=1 forces the sm80 tiles (lets an sm90 test run them too).
    if (!knobs().cuda_small_tiles && max_smem_per_block(device) >= Large::kSmemBytes)
      return run_bwd_tile<Large>(p, device, stream);
  }
  run_bwd_tile<Small>(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
