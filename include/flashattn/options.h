// The knobs of attention, with flash_attn's meanings and defaults.
#pragma once

#include <optional>

#include "flashattn/tensor.h"

namespace flashattn {

struct Options {
  // Multiplies Q K^T. Unset: 1 / sqrt(head_dim).
  std::optional<float> softmax_scale;
  // Bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q.
  bool causal = false;
  // Sliding window (left, right) around the same diagonal; -1 = unbounded on that side.
  int window_left = -1;
  int window_right = -1;
  // > 0: scores become softcap * tanh(scores / softcap) before masking.
  float softcap = 0.0f;
  // fp32 slopes, shape (heads) or (batch, heads): adds -slope * |i + seqlen_k - seqlen_q - j|.
  std::optional<Tensor> alibi_slopes;
  // Forward only: int32 (batch), on the tensors' device. Sequence b attends only the first
  // seqused_k[b] of its keys, as if k/v ended there (flash_attn_with_kvcache's cache_seqlens): a
  // fixed-size KV cache filled to a different length per sequence. Causal / window / ALiBi align
  // on that length. Each value must lie in [0, seqlen_k] (varlen: [0, that sequence's keys]);
  // CPU tensors are checked, CUDA ones trusted (reading them would synchronise the host).
  std::optional<Tensor> seqused_k;
  // Forward only: int32 (batch), flash_attn v3's seqused_q. Sequence b uses only the first
  // seqused_q[b] of its query rows (the rest of its rows are neither read nor written); causal /
  // window / ALiBi align on that length. Each value in [0, that sequence's rows].
  std::optional<Tensor> seqused_q;
  // Attention sinks (gpt-oss; flash-attn-4's learnable_sink, transformers' s_aux): fp32 (heads),
  // on the tensors' device. Head h's sink is a logit that joins every row's softmax denominator
  // without a value: LSE' = log(exp(LSE) + exp(sinks[h])), O' = O * exp(LSE - LSE'). Neither the
  // softmax scale nor softcap applies to it. A row that sees no key gets O = 0 and LSE = sinks[h].
  // The backward takes the forward's LSE' (it already holds the sink); sink_gradient() gives
  // the sinks' own gradient.
  std::optional<Tensor> sinks;
  // Backward: bitwise-identical results run to run.
  bool deterministic = false;

  // CPU: threads to use; 0 = OpenMP's default.
  int num_threads = 0;
  // Key splits for decoding (flash-decoding); 0 = heuristic, 1 = never split.
  int num_splits = 0;
  // CUDA: the stream to run on (a cudaStream_t); nullptr = the default stream.
  void* stream = nullptr;
};

}  // namespace flashattn
