// "Standard attention": what a user without FlashAttention runs. It materialises the full
// S = scale * Q K^T and P = softmax(S) for every (batch, head) at once, like PyTorch eager,
// does both products with the system BLAS (sgemm), and rounds S, P and O to the input dtype
// (fp16/bf16), which makes it the same-precision baseline of the docs/DESIGN.md §5 tolerance rule and
// the honest speed/memory comparison for flashattn-bench.
#pragma once

#include <cstdint>

#include "flashattn/flashattn.h"

namespace flashattn::standard {

// Bytes the standard attention allocates beyond its inputs and outputs for this problem
// (forward or forward+backward). Used by flashattn-bench to refuse runs that would not fit.
int64_t workspace_bytes(const Tensor& q, const Tensor& k, const Tensor& v, bool backward);

// Same contract as flashattn::forward / backward (fixed-length batches, CPU tensors).
// options.num_threads sets the BLAS threads (0 = BLAS default).
void forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
             const Tensor& lse, const Options& options = {});
void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
              const Tensor& dv, const Options& options = {});

}  // namespace flashattn::standard
