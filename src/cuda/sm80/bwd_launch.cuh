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

#include "cuda/common/check.h"
#include "cuda/sm80/bwd_kernel.cuh"
#include "cuda/sm80/bwd_launch.h"
#include "cuda/sm80/bwd_prepost.cuh"
#include "flashattn/error.h"

namespace flashattn::cuda::sm80 {

// Device memory in stream order (cudaMallocAsync / cudaFreeAsync): the three kernels queued between
// allocation and release use it, and no host synchronisation is needed. Freed on every exit path,
// a launch that throws included.
class StreamWorkspace {
 public:
  StreamWorkspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    FA_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~StreamWorkspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  StreamWorkspace(const StreamWorkspace&) = delete;
  StreamWorkspace& operator=(const StreamWorkspace&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

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
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  BwdArgs args;
  args.group = p.heads / p.heads_k;
  args.block_m = kBlockM;
  args.scale_log2 = p.scale * detail::kLog2e;
  const int64_t n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int64_t m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t main_blocks = n_blocks * p.heads_k * p.batch;
  const int64_t row_blocks = m_blocks * p.heads * p.batch;
  if (main_blocks > INT_MAX)
    throw Unsupported("flashattn: CUDA backward: " + std::to_string(main_blocks) + " key blocks (seqlen_k / " +
                      std::to_string(kBlockN) + " x heads_k x batch) exceed the grid limit of 2^31 - 1");
  if (row_blocks > INT_MAX)
    throw Unsupported("flashattn: CUDA backward: " + std::to_string(row_blocks) + " query blocks (seqlen_q / " +
                      std::to_string(kBlockM) + " x heads x batch) exceed the grid limit of 2^31 - 1");
  args.n_blocks = int(n_blocks);
  args.m_blocks = int(m_blocks);
  args.ws_rows = (p.total_q + int64_t(kBlockM) * p.batch + kBlockM - 1) / kBlockM * kBlockM;

  // Workspace: dQ accumulator, LSE*log2e, D, and the deterministic mode's counters. Every part is a
  // multiple of 256 bytes (ws_rows is a multiple of kBlockM = 64), so each starts 16-byte aligned.
  const size_t acc_bytes = size_t(p.heads) * size_t(args.ws_rows) * Tr::kHeadDim * sizeof(float);
  const size_t row_bytes = size_t(p.heads) * size_t(args.ws_rows) * sizeof(float);
  const size_t sem_bytes = p.deterministic ? size_t(p.batch) * p.heads * size_t(m_blocks) * sizeof(int) : 0;
  StreamWorkspace ws(acc_bytes + 2 * row_bytes + sem_bytes, stream);
  args.dq_accum = reinterpret_cast<float*>(ws.data());
  args.lse2 = reinterpret_cast<float*>(ws.data() + acc_bytes);
  args.delta = reinterpret_cast<float*>(ws.data() + acc_bytes + row_bytes);
  if (sem_bytes) {
    args.dq_semaphore = reinterpret_cast<int*>(ws.data() + acc_bytes + 2 * row_bytes);
    FA_CUDA_CHECK(cudaMemsetAsync(args.dq_semaphore, 0, sem_bytes, stream));
  }

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
    const char* force_small = std::getenv("FLASHATTN_CUDA_SMALL_TILES");
    if (!(force_small && force_small[0] == '1') && max_smem_per_block(device) >= Large::kSmemBytes)
      return run_bwd_tile<Large>(p, device, stream);
  }
  run_bwd_tile<Small>(p, device, stream);
}

}  // namespace flashattn::cuda::sm80
