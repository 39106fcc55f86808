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
