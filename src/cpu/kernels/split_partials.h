// Split-KV (flash-decoding) partial results on the CPU: each key chunk ("split") of a row is
// attended on its own into an fp32 O_c and LSE_c, and cpu::merge combines the chunks into the
// caller's out and lse. Shared by the tiled forward and the decode path.
#pragma once

#include <vector>

#include "core/params.h"
#include "cpu/backend.h"
#include "cpu/kernels/isa.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {

class SplitPartials {
 public:
  SplitPartials(const AttnParams& p, int splits)
      : out_(int64_t(splits) * p.batch * p.seqlen_q * p.heads * p.head_dim_v),
        lse_(int64_t(splits) * p.batch * p.heads * p.seqlen_q) {
    // merge()'s layout: O_c (splits, batch, seqlen_q, heads, d_v), LSE_c (splits, batch, heads, seqlen_q)
    mp_.device = p.device;
    mp_.splits = splits;
    mp_.batch = p.batch;
    mp_.heads = p.heads;
    mp_.head_dim_v = p.head_dim_v;
    mp_.seqlen_q = p.seqlen_q;
    mp_.partial_out = out_.data();
    mp_.po_head_stride = p.head_dim_v;
    mp_.po_row_stride = mp_.po_head_stride * p.heads;
    mp_.po_batch_stride = mp_.po_row_stride * p.seqlen_q;
    mp_.po_split_stride = mp_.po_batch_stride * p.batch;
    mp_.partial_lse = lse_.data();
    mp_.pl_row_stride = 1;
    mp_.pl_head_stride = p.seqlen_q;
    mp_.pl_batch_stride = p.seqlen_q * p.heads;
    mp_.pl_split_stride = mp_.pl_batch_stride * p.batch;
  }

  // Row i (relative to its sequence) of sequence b, head h.
  float* out(int split, int b, int64_t i, int h) {
    return out_.data() + split * mp_.po_split_stride + b * mp_.po_batch_stride + i * mp_.po_row_stride +
           h * mp_.po_head_stride;
  }
  float& lse(int split, int b, int64_t i, int h) {
    return lse_[split * mp_.pl_split_stride + b * mp_.pl_batch_stride + h * mp_.pl_head_stride +
                i * mp_.pl_row_stride];
  }

  // Combines the splits straight into p.out / p.lse (varlen rows through cu_seqlens_q).
  void merge_into(const AttnParams& p, int threads) {
    mp_.out_dtype = p.dtype;
    mp_.out = p.out;
    mp_.out_stride = p.out_stride;
    mp_.lse = p.lse;
    mp_.lse_batch_stride = p.lse_batch_stride;
    mp_.lse_head_stride = p.lse_head_stride;
    mp_.lse_row_stride = 1;
    mp_.cu_seqlens_q = p.cu_seqlens_q;
    mp_.sinks = p.sinks;
    mp_.seqused_q = p.seqused_q;
    mp_.num_threads = threads;
    cpu::merge(mp_);
  }

 private:
  std::vector<float> out_, lse_;
  MergeParams mp_;
};

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
