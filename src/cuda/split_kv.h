// Split-KV (flash-decoding) on CUDA: how many key splits a forward launch takes, where the
// splits' fp32 partial results live, and how they become out / lse.
//
// A launch that would leave most of the GPU idle (few sequences x heads x query blocks, long
// keys) cuts each sequence's keys into `splits` chunks of `chunk` keys. The CTA of split c
// attends only keys [c * chunk, (c + 1) * chunk) and writes its normalised O_c and LSE_c in fp32;
// the merge kernel (merge.cu) then forms LSE = log sum_c exp(LSE_c), O = sum_c exp(LSE_c - LSE) O_c
// in the output dtype. The workspace comes from the stream-ordered allocator: no host sync.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/host_device.h"
#include "core/params.h"

namespace flashattn::cuda {

// Partial results, dense fp32 in merge()'s layout: out (splits, batch, seqlen_q, heads, head_dim_v),
// lse (splits, batch, heads, seqlen_q). Rows are relative to their sequence (varlen included).
struct PartialOut {
  float* out = nullptr;
  float* lse = nullptr;
  int heads = 0, head_dim_v = 0;
  int64_t seqlen_q = 0, batch = 0;

  FA_HOST_DEVICE int64_t out_row_stride() const { return int64_t(heads) * head_dim_v; }
  FA_HOST_DEVICE int64_t out_batch_stride() const { return seqlen_q * out_row_stride(); }
  FA_HOST_DEVICE int64_t out_split_stride() const { return batch * out_batch_stride(); }
  FA_HOST_DEVICE int64_t lse_head_stride() const { return seqlen_q; }
  FA_HOST_DEVICE int64_t lse_batch_stride() const { return heads * seqlen_q; }
  FA_HOST_DEVICE int64_t lse_split_stride() const { return batch * lse_batch_stride(); }

  FA_HOST_DEVICE float* out_at(int split, int b, int64_t i, int h) const {
    return out + split * out_split_stride() + b * out_batch_stride() + i * out_row_stride() +
           int64_t(h) * head_dim_v;
  }
  FA_HOST_DEVICE float* lse_at(int split, int b, int64_t i, int h) const {
    return lse + split * lse_split_stride() + b * lse_batch_stride() + h * lse_head_stride() + i;
  }
};

struct SplitPlan {
  int splits = 1;
  int64_t chunk = 0;  // keys per split: a multiple of the kernel's key unit, >= seqlen_k when splits == 1
};

// The split count of one launch: options.num_splits when set (clamped to the key units; trailing
// splits may then be empty), else the heuristic below.
//   ctas:     CTAs of the un-split launch
//   slots:    CTAs the GPU holds at once (SMs x resident CTAs per SM of this kernel)
//   unit:     keys a split's length is a multiple of (the kernel's key block, or its CTA's share)
//   min_keys: the fewest keys a heuristic split may get (below that the partial write and the
//             merge cost more than the extra parallelism returns)
SplitPlan plan_splits(const AttnParams& p, int64_t ctas, int64_t slots, int64_t unit, int64_t min_keys);

// Streaming multiprocessors of `device` (cached).
int sm_count(int device);

// The fp32 partials of one split forward: allocated on the stream at construction, merged into
// p.out / p.lse by merge_into(), released on the stream when it goes out of scope (stream order
// keeps the release after the merge).
class SplitWorkspace {
 public:
  SplitWorkspace(const AttnParams& p, int splits, cudaStream_t stream);
  ~SplitWorkspace();
  SplitWorkspace(const SplitWorkspace&) = delete;
  SplitWorkspace& operator=(const SplitWorkspace&) = delete;

  const PartialOut& partial() const { return partial_; }
  // out / lse of p from the splits' partials (the merge kernel on p's stream).
  void merge_into(const AttnParams& p) const;

 private:
  PartialOut partial_;
  int splits_ = 0;
  void* buffer_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace flashattn::cuda
