// The single definition of which keys a query sees (Mask) and how a raw score is transformed
// (ScoreMod, value and derivative). The fp64 oracle, the standard-attention baseline, the CPU
// kernels and every CUDA kernel (sm80 forward / backward / decode, sm90 forward / backward) call
// this header, so a semantic change happens here and nowhere else (docs/DESIGN.md, "Mask and
// score modifier").
//
// Alignment is bottom-right: query row i sits on the diagonal key i + seqlen_k - seqlen_q.
// Causal is the window (left, 0). A window bound of -1 is unbounded.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/host_device.h"

namespace flashattn {

// How a block of (query rows) x (keys) relates to the mask: skipped, masked element by element,
// or computed without a mask.
enum class BlockVisibility { kEmpty, kPartial, kFull };

// The mask of one sequence in an integer type of the caller's choice: int64_t on the host and the
// CPU; int in the CUDA kernels, whose dispatch keeps seqlen_q + seqlen_k < 2^30. make() clamps the
// window bounds to that span (a bound past it sees as much as an unbounded one), so no expression
// below overflows an int.
template <typename Int>
struct BasicMask {
  Int seqlen_q = 0;
  Int seqlen_k = 0;
  Int window_left = -1;  // causal is already folded in: window_right == 0
  Int window_right = -1;

  FA_HOST_DEVICE static BasicMask make(int64_t seqlen_q, int64_t seqlen_k, int64_t window_left,
                                       int64_t window_right) {
    const int64_t span = seqlen_q + seqlen_k;
    return BasicMask{Int(seqlen_q), Int(seqlen_k), Int(window_left < 0 ? -1 : window_left < span ? window_left : span),
                     Int(window_right < 0 ? -1 : window_right < span ? window_right : span)};
  }

  FA_HOST_DEVICE Int diagonal(Int i) const { return i + seqlen_k - seqlen_q; }

  // Visible keys of row i are [key_begin(i), key_end(i)); empty when begin >= end.
  // The form matters on the GPU: written as diagonal(i) - window with compare-and-select clamps,
  // the sm90 forward's 128-register d64 tile spilled 104 bytes; with the offset in one piece and
  // min/max (IMNMX) its SASS is identical to the hand-written code these replaced, and it runs as
  // fast (bench/gpu/NOTES.md, session 4).
  FA_HOST_DEVICE Int key_begin(Int i) const {
    return window_left < 0 ? 0 : clamp(i + seqlen_k - seqlen_q - window_left, 0, seqlen_k);
  }
  FA_HOST_DEVICE Int key_end(Int i) const {
    return window_right < 0 ? seqlen_k : clamp(i + seqlen_k - seqlen_q + window_right + 1, 0, seqlen_k);
  }
  FA_HOST_DEVICE static Int clamp(Int x, Int lo, Int hi) {
#if defined(__CUDA_ARCH__)
    return min(max(x, lo), hi);
#else
    return x < lo ? lo : (x > hi ? hi : x);
#endif
  }
  FA_HOST_DEVICE bool visible(Int i, Int j) const { return j >= key_begin(i) && j < key_end(i); }

  // The same visibility as an offset test, for masking many (row, key) pairs without holding
  // per-row bounds: key 0 <= j < seqlen_k is visible to row i iff
  //   lowest_offset() <= j - i <= highest_offset()
  // (key_begin / key_end clamp to [0, seqlen_k]; inside that range the clamps change nothing).
  FA_HOST_DEVICE Int lowest_offset() const {
    return window_left < 0 ? -(Int(1) << 30) : seqlen_k - seqlen_q - window_left;
  }
  FA_HOST_DEVICE Int highest_offset() const {
    return window_right < 0 ? (Int(1) << 30) : seqlen_k - seqlen_q + window_right;
  }

  // Both bounds are monotone in i, so rows [r0, r1) together see keys
  // [key_begin(r0), key_end(r1 - 1)), and a key block inside every row's range needs no mask.
  FA_HOST_DEVICE bool block_fully_visible(Int r0, Int r1, Int c0, Int c1) const {
    return c0 >= key_begin(r1 - 1) && c1 <= key_end(r0);
  }
  FA_HOST_DEVICE BlockVisibility classify(Int r0, Int r1, Int c0, Int c1) const {
    if (r1 <= r0 || c1 <= c0 || c0 >= key_end(r1 - 1) || c1 <= key_begin(r0)) return BlockVisibility::kEmpty;
    return block_fully_visible(r0, r1, c0, c1) ? BlockVisibility::kFull : BlockVisibility::kPartial;
  }

  // The rows of [r0, r1) that see some key of [c0, c1): a contiguous range, since both key bounds
  // are monotone in the row (binary searches). The backward's key-block owners use it to find
  // their query rows; r0 = r1 = rows past the ones that see any key (c0 = 0, c1 = seqlen_k).
  struct Rows {
    Int begin, end;
  };
  FA_HOST_DEVICE Rows rows_seeing(Int c0, Int c1, Int r0, Int r1) const {
    const Int begin = first_row(r0, r1, [&](Int i) { return key_end(i) > c0; });
    return {begin, first_row(begin, r1, [&](Int i) { return key_begin(i) >= c1; })};
  }
  FA_HOST_DEVICE Rows rows_seeing(Int c0, Int c1) const { return rows_seeing(c0, c1, 0, seqlen_q); }

  // ALiBi's distance |diagonal(i) - j| of key j from row i's diagonal key.
  FA_HOST_DEVICE Int distance(Int i, Int j) const {
    const Int d = diagonal(i) - j;
    return d < 0 ? -d : d;
  }

 private:
  // First i in [lo, hi) where the monotone pred turns true (hi when it never does).
  template <typename Pred>
  FA_HOST_DEVICE static Int first_row(Int lo, Int hi, Pred pred) {
    while (lo < hi) {
      const Int mid = lo + (hi - lo) / 2;
      if (pred(mid))
        hi = mid;
      else
        lo = mid + 1;
    }
    return lo;
  }
};

using Mask = BasicMask<int64_t>;
using Mask32 = BasicMask<int>;

// tanh and a broadcast constant for the value types ScoreMod is used with. The CPU kernels
// specialise it for their SIMD vectors (cpu/kernels/simd.h); float and double take the host's or
// the device's tanh.
template <typename V>
struct ScoreMath {
  FA_HOST_DEVICE static V tanh(V x) {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(V) == sizeof(float)) return tanhf(x);
    else return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
  FA_HOST_DEVICE static V splat(float x) { return V(x); }
};

// scale * q.k -> softcap -> + ALiBi bias, applied before masking as flash_attn does. V is the
// value type (float, double or a CPU SIMD vector); `distance` is Mask::distance of the pair, in V.
struct ScoreMod {
  float softcap = 0.0f;      // 0 = off
  float inv_softcap = 0.0f;  // 1 / softcap (0 when off): one multiply per score instead of a divide
  float alibi_slope = 0.0f;  // 0 = off; per (batch, head)

  FA_HOST_DEVICE static ScoreMod make(float softcap, float alibi_slope) {
    return ScoreMod{softcap, softcap > 0 ? 1.0f / softcap : 0.0f, alibi_slope};
  }
  // Head h of sequence b: ALiBi slopes are [b * batch_stride + h] (batch_stride 0: per head only).
  FA_HOST_DEVICE static ScoreMod of(float softcap, const float* alibi_slopes, int64_t batch_stride, int b, int h) {
    return make(softcap, alibi_slopes ? alibi_slopes[b * batch_stride + h] : 0.0f);
  }
  FA_HOST_DEVICE bool active() const { return softcap > 0 || alibi_slope != 0; }

  // softcap * tanh(x / softcap), and with it d/dx = 1 - tanh^2.
  template <typename V>
  FA_HOST_DEVICE V cap(V x) const {
    return softcap * ScoreMath<V>::tanh(capped_argument(x));
  }
  template <typename V>
  FA_HOST_DEVICE V cap(V x, V& dcap) const {
    const V t = ScoreMath<V>::tanh(capped_argument(x));
    dcap = 1.0f - t * t;
    return softcap * t;
  }
  // ALiBi's additive bias at that distance.
  template <typename V>
  FA_HOST_DEVICE V bias(V distance) const {
    return -alibi_slope * distance;
  }

  template <typename V>
  FA_HOST_DEVICE V apply(V x, V distance) const {
    if (softcap > 0) x = cap(x);
    if (alibi_slope != 0) x += bias(distance);
    return x;
  }
  // The transformed score and, in dscore, its derivative with respect to x.
  template <typename V>
  FA_HOST_DEVICE V apply(V x, V distance, V& dscore) const {
    dscore = ScoreMath<V>::splat(1.0f);
    if (softcap > 0) x = cap(x, dscore);
    if (alibi_slope != 0) x += bias(distance);
    return x;
  }
  // x / softcap: the kernels multiply by the rounded inverse, the fp64 oracle divides exactly.
  template <typename V>
  FA_HOST_DEVICE V capped_argument(V x) const {
    if constexpr (std::is_same_v<V, double>) return x / double(softcap);
    else return x * inv_softcap;
  }

  // Row i, key j of a sequence with this mask (the distance only computed when ALiBi is on: the
  // kernels' score-modifier loops hold no distances for a softcap alone).
  template <typename V, typename Int>
  FA_HOST_DEVICE V apply(V x, Int i, Int j, const BasicMask<Int>& mask) const {
    if (softcap > 0) x = cap(x);
    if (alibi_slope != 0) x += bias(V(mask.distance(i, j)));
    return x;
  }
  template <typename V, typename Int>
  FA_HOST_DEVICE V apply(V x, Int i, Int j, const BasicMask<Int>& mask, V& dscore) const {
    dscore = ScoreMath<V>::splat(1.0f);
    if (softcap > 0) x = cap(x, dscore);
    if (alibi_slope != 0) x += bias(V(mask.distance(i, j)));
    return x;
  }
};

}  // namespace flashattn
