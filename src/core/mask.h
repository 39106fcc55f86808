// The single definition of which keys a query sees and how a raw score is transformed.
// The fp64 oracle, the CPU kernels and the CUDA kernels all use this header, so a semantic
// change happens in one place.
//
// Alignment is bottom-right: query row i sits on the diagonal key i + seqlen_k - seqlen_q.
// Causal is the window (left, 0). A window bound of -1 is unbounded.
#pragma once

#include <cstdint>
#include <cmath>

#include "core/host_device.h"

namespace flashattn {

struct Mask {
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int64_t window_left = -1;   // causal is already folded in: window_right == 0
  int64_t window_right = -1;

  FA_HOST_DEVICE int64_t diagonal(int64_t i) const { return i + seqlen_k - seqlen_q; }

  // Visible keys of row i are [key_begin(i), key_end(i)); empty when begin >= end.
  FA_HOST_DEVICE int64_t key_begin(int64_t i) const {
    if (window_left < 0) return 0;
    int64_t b = diagonal(i) - window_left;
    return b < 0 ? 0 : (b > seqlen_k ? seqlen_k : b);
  }
  FA_HOST_DEVICE int64_t key_end(int64_t i) const {
    if (window_right < 0) return seqlen_k;
    int64_t e = diagonal(i) + window_right + 1;
    return e < 0 ? 0 : (e > seqlen_k ? seqlen_k : e);
  }
  FA_HOST_DEVICE bool visible(int64_t i, int64_t j) const {
    return j >= key_begin(i) && j < key_end(i);
  }
  // Both bounds are monotone in i, so a block of rows [r0, r1) sees keys
  // [key_begin(r0), key_end(r1 - 1)); a key block fully inside every row's range needs no mask.
  FA_HOST_DEVICE bool block_fully_visible(int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
    return c0 >= key_begin(r1 - 1) && c1 <= key_end(r0);
  }
};

// scale * q.k -> softcap -> + alibi bias. Applied before masking, as flash_attn does.
struct ScoreMod {
  float softcap = 0.0f;      // 0 = off
  float alibi_slope = 0.0f;  // 0 = off; per (batch, head)

  template <typename T>
  FA_HOST_DEVICE T apply(T scaled_score, int64_t i, int64_t j, const Mask& mask) const {
    T s = scaled_score;
    if (softcap > 0) s = T(softcap) * std::tanh(s / T(softcap));
    if (alibi_slope != 0) {
      int64_t dist = mask.diagonal(i) - j;
      s -= T(alibi_slope) * T(dist < 0 ? -dist : dist);
    }
    return s;
  }
};

}  // namespace flashattn
