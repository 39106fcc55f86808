// The fp64 oracle: attention computed the textbook way (materialising S and P for one
// (batch, head) at a time) in double precision, with the library's one mask definition.
// Every backend is checked against it. Inputs are the same tensors a kernel call takes.
#pragma once

#include <vector>

#include "flashattn/flashattn.h"

namespace flashattn::ref {

// Dense results. out: (rows, heads, head_dim_v) where rows = batch * seqlen_q (or total_q for
// varlen); lse: (batch, heads, seqlen_q) (or (heads, total_q) for varlen). Empty rows: 0 and -inf.
struct ForwardResult {
  std::vector<double> out, lse;
};

// dq: (rows_q, heads, head_dim), dk: (rows_k, heads_k, head_dim), dv: (rows_k, heads_k, head_dim_v).
// dsinks: (heads) when options.sinks is set, else empty.
struct BackwardResult {
  std::vector<double> dq, dk, dv, dsinks;
};

// forward_kvcache: out/lse as ForwardResult (fixed-length layout), and the caches after the
// append, every element in logical row-major order of k_cache / v_cache (untouched elements
// keep their values). The appended keys are rotated in fp64 and stored in the cache's dtype, as
// is q before the attention (the values a kernel must store and use).
struct KVCacheResult {
  std::vector<double> out, lse, k_cache, v_cache;
};

ForwardResult forward(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options = {},
                      const VarlenLayout* layout = nullptr);

KVCacheResult forward_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                              const Options& options = {});

// Gradients given dout (the shape of out, the dtype of q), recomputing everything in fp64.
BackwardResult backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Options& options = {}, const VarlenLayout* layout = nullptr);

}  // namespace flashattn::ref
