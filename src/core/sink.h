// The single definition of an attention sink (gpt-oss; flash-attn-4's learnable_sink,
// transformers' s_aux): a per-head logit sigma that joins each row's softmax denominator without
// contributing a value. Given a row's result without it, (O, LSE):
//   LSE' = log(exp(LSE) + exp(sigma)),   O' = O * exp(LSE - LSE')  (= O * sigmoid(LSE - sigma))
// A row that sees no key (LSE = -inf) gets O' = 0 and LSE' = sigma. Neither the softmax scale nor
// softcap applies to sigma. Split-KV folds it in once, after the splits are combined.
// Backward: with LSE' saved, P = exp(S - LSE') is already right, and
//   d sigma = -sum over rows of exp(sigma - LSE') * rowsum(dO * O').
#pragma once

#include <cmath>

#include "core/host_device.h"

namespace flashattn {

struct SinkedRow {
  float out_scale;  // multiplies O
  float lse;        // LSE'
};

FA_HOST_DEVICE SinkedRow add_sink(float lse, float sink) {
  if (lse == -INFINITY) return {0.0f, sink};
  // Relative to the larger term, so neither exp overflows.
  const float hi = lse > sink ? lse : sink;
  const float lse_new = hi + logf(expf(lse - hi) + expf(sink - hi));
  return {expf(lse - lse_new), lse_new};
}

// The fp64 form for the oracle.
inline double add_sink_lse(double lse, double sink) {
  if (lse == -INFINITY) return sink;
  const double hi = lse > sink ? lse : sink;
  return hi + std::log(std::exp(lse - hi) + std::exp(sink - hi));
}

// One row's term of d sigma: -exp(sigma - LSE') * D, D = rowsum(dO * O').
inline double sink_grad_term(double sink, double lse_with_sink, double dout_dot_out) {
  return -std::exp(sink - lse_with_sink) * dout_dot_out;
}

}  // namespace flashattn
