#include "cuda/split_kv.h"

#include <algorithm>
#include <atomic>
#include <string>

#include "cuda/backend.h"
#include "cuda/common/check.h"

namespace flashattn::cuda {
namespace {

// More splits than this only add merge work: 128 x 132 SMs is far past filling any GPU.
constexpr int64_t kMaxHeuristicSplits = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

SplitPlan plan_splits(const AttnParams& p, int64_t ctas, int64_t slots, int64_t unit, int64_t min_keys) {
  const int64_t units = std::max<int64_t>(1, ceil_div(p.seqlen_k, unit));
  int64_t splits = 1;
  if (p.num_splits > 0) {
    splits = std::min<int64_t>(p.num_splits, units);
  } else if (ctas > 0 && slots > 0 && 5 * ctas < 4 * slots) {
    // Like flash-decoding: the fewest splits whose CTAs fill the GPU in nearly whole waves (a
    // partly filled last wave leaves SMs idle), taking the smallest count within 85% of the best.
    const int64_t most = std::clamp<int64_t>(p.seqlen_k / std::max<int64_t>(min_keys, 1), 1, kMaxHeuristicSplits);
    auto efficiency = [&](int64_t s) {
      const double waves = double(ctas * s) / double(slots);
      return waves / double(ceil_div(ctas * s, slots));
    };
    double best = 0;
    for (int64_t s = 1; s <= most; ++s) best = std::max(best, efficiency(s));
    for (int64_t s = 1; s <= most; ++s)
      if (efficiency(s) >= 0.85 * best) {
        splits = s;
        break;
      }
  }
  SplitPlan plan;
  plan.chunk = ceil_div(ceil_div(std::max<int64_t>(p.seqlen_k, 1), splits), unit) * unit;
  // The heuristic drops the splits that rounding the chunk up to whole units left empty; an
  // explicit count is kept as asked (its empty splits merge as LSE = -inf).
  plan.splits = int(p.num_splits > 0 ? splits : std::max<int64_t>(1, ceil_div(p.seqlen_k, plan.chunk)));
  return plan;
}

int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  if (device >= 0 && device < 64) {
    if (const int n = cached[device].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  FA_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

SplitWorkspace::SplitWorkspace(const AttnParams& p, int splits, cudaStream_t stream)
    : splits_(splits), stream_(stream) {
  partial_.heads = p.heads;
  partial_.head_dim_v = p.head_dim_v;
  partial_.seqlen_q = p.seqlen_q;
  partial_.batch = p.batch;
  const int64_t out_floats = splits * partial_.out_split_stride();
  const int64_t lse_floats = splits * partial_.lse_split_stride();
  // The LSEs first, then O at a 16-byte aligned offset (the kernels store O in 16-byte vectors).
  const int64_t lse_padded = (lse_floats + 3) / 4 * 4;
  FA_CUDA_CHECK(cudaMallocAsync(&buffer_, size_t(lse_padded + out_floats) * sizeof(float), stream));
  partial_.lse = static_cast<float*>(buffer_);
  partial_.out = partial_.lse + lse_padded;
}

SplitWorkspace::~SplitWorkspace() {
  if (buffer_) cudaFreeAsync(buffer_, stream_);  // no throwing from a destructor; errors surface later
}

void SplitWorkspace::merge_into(const AttnParams& p) const {
  MergeParams m;
  m.device = p.device;
  m.splits = splits_;
  m.batch = p.batch;
  m.heads = p.heads;
  m.head_dim_v = p.head_dim_v;
  m.seqlen_q = p.seqlen_q;
  m.partial_out = partial_.out;
  m.po_split_stride = partial_.out_split_stride();
  m.po_batch_stride = partial_.out_batch_stride();
  m.po_row_stride = partial_.out_row_stride();
  m.po_head_stride = p.head_dim_v;
  m.partial_lse = partial_.lse;
  m.pl_split_stride = partial_.lse_split_stride();
  m.pl_batch_stride = partial_.lse_batch_stride();
  m.pl_head_stride = partial_.lse_head_stride();
  m.pl_row_stride = 1;
  m.out_dtype = p.dtype;
  m.out = p.out;
  m.out_stride = p.out_stride;
  m.lse = p.lse;
  m.lse_batch_stride = p.lse_batch_stride;
  m.lse_head_stride = p.lse_head_stride;
  m.lse_row_stride = 1;
  m.cu_seqlens_q = p.cu_seqlens_q;
  m.seqused_q = p.seqused_q;  // varlen: sequence b's row i is packed row cu[b] + i
  m.stream = stream_;
  merge(m);
}

}  // namespace flashattn::cuda
