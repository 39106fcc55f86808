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
struct BackwardResult {
  std::vector<double> dq, dk, dv;
};

ForwardResult forward(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options = {},
                      const VarlenLayout* layout = nullptr);

// Gradients given dout (the shape of out, the dtype of q), recomputing everything in fp64.
BackwardResult backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Options& options = {}, const VarlenLayout* layout = nullptr);

}  // namespace flashattn::ref
