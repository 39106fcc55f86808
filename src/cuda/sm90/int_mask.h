// core/mask.h's Mask in int arithmetic, for the sm90 kernels of a fixed-length batch (every
// sequence has seqlen_q queries and seqlen_k keys). The dispatch keeps seqlen_q + seqlen_k < 2^30,
// and set() clamps the window bounds to that span, so no expression below overflows an int.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flashattn::cuda::sm90 {

struct IntMask {
  int seqlen_q, seqlen_k;
  // -1 = unbounded; causal is (-1 or left, 0). Bounds beyond seqlen_q + seqlen_k act as unbounded
  // ones and are clamped to it.
  int window_left, window_right;

  void set(int64_t seqlen_q_, int64_t seqlen_k_, int64_t window_left_, int64_t window_right_) {
    const int64_t span = seqlen_q_ + seqlen_k_;
    seqlen_q = int(seqlen_q_);
    seqlen_k = int(seqlen_k_);
    window_left = window_left_ < 0 ? -1 : int(std::min(window_left_, span));
    window_right = window_right_ < 0 ? -1 : int(std::min(window_right_, span));
  }

#if defined(__CUDACC__)
  // Visible keys of query row i are [key_begin(i), key_end(i)) (bottom-right aligned diagonal
  // i + seqlen_k - seqlen_q).
  __device__ __forceinline__ int key_begin(int i) const {
    return window_left < 0 ? 0 : min(max(i + seqlen_k - seqlen_q - window_left, 0), seqlen_k);
  }
  __device__ __forceinline__ int key_end(int i) const {
    return window_right < 0 ? seqlen_k : min(max(i + seqlen_k - seqlen_q + window_right + 1, 0), seqlen_k);
  }
  // The same visibility as an offset test, for masking many (row, key) pairs without holding
  // per-row bounds: key j is visible to row i iff j < seqlen_k and
  //   lowest <= j - i <= highest,  lowest = seqlen_k - seqlen_q - window_left (or far below),
  //                                highest = seqlen_k - seqlen_q + window_right (or far above).
  // (key_begin / key_end clamp to [0, seqlen_k]; for 0 <= j < seqlen_k the clamps change nothing.)
  __device__ __forceinline__ int lowest_offset() const {
    return window_left < 0 ? -(1 << 30) : seqlen_k - seqlen_q - window_left;
  }
  __device__ __forceinline__ int highest_offset() const {
    return window_right < 0 ? (1 << 30) : seqlen_k - seqlen_q + window_right;
  }
  // Every row of [r0, r1) sees every key of [c0, c1): the block needs no mask.
  __device__ __forceinline__ bool block_fully_visible(int r0, int r1, int c0, int c1) const {
    return c0 >= key_begin(r1 - 1) && c1 <= key_end(r0);
  }
#endif
};

}  // namespace flashattn::cuda::sm90
