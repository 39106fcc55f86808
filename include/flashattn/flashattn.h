// flashattn: exact attention that never materialises the n x n score matrix.
//
// Layouts follow flash_attn:
//   q (batch, seqlen_q, heads, d), k (batch, seqlen_k, heads_k, d), v (batch, seqlen_k, heads_k, d_v)
//   out (batch, seqlen_q, heads, d_v), lse fp32 (batch, heads, seqlen_q)
// Variable length: q (total_q, heads, d), k/v (total_k, heads_k, d), out (total_q, heads, d_v),
//   lse fp32 (heads, total_q), cu_seqlens_* int32 (batch + 1), non-decreasing, starting at 0.
// heads % heads_k == 0 (GQA/MQA): query head h reads kv head h / (heads / heads_k).
// The backend follows the tensors' device; all tensors of one call share it.
#pragma once

#include "flashattn/error.h"
#include "flashattn/options.h"
#include "flashattn/tensor.h"

namespace flashattn {

// O = softmax(scale * Q K^T + mask) V, and LSE = logsumexp of each row (-inf for empty rows).
// The forward's lse may be left empty (a default Tensor{}: no data, rank 0) when the caller does
// not want it: nothing is written there (an inference call saves allocating it). The backward
// needs the forward's lse.
void forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
             const Tensor& lse, const Options& options = {});

// dQ, dK, dV from dO and the forward's Q, K, V, O, LSE. Gradients have their input's shape.
void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
              const Tensor& dv, const Options& options = {});

struct VarlenLayout {
  Tensor cu_seqlens_q;  // int32 (batch + 1), same device as q
  Tensor cu_seqlens_k;  // int32 (batch + 1)
  int max_seqlen_q = 0;
  int max_seqlen_k = 0;
};

void forward_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& lse, const VarlenLayout& layout, const Options& options = {});

void backward_varlen(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                     const Tensor& dv, const VarlenLayout& layout, const Options& options = {});

// Combines attention over disjoint key sets (split-KV, cascade, ring attention):
//   partial_out fp32 (splits, batch, seqlen_q, heads, d_v), partial_lse fp32 (splits, batch, heads, seqlen_q)
//   -> out (batch, seqlen_q, heads, d_v) in any float dtype, lse fp32 (batch, heads, seqlen_q).
// LSE = log sum_c exp(LSE_c); O = sum_c exp(LSE_c - LSE) O_c. Splits with LSE_c = -inf contribute nothing.
void merge(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& out,
           const Tensor& lse, const Options& options = {});

// What this build and machine offer.
bool cuda_available();
const char* version();

}  // namespace flashattn
