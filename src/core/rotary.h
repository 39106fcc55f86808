// The single definition of rotary position embedding as flash_attn_with_kvcache applies it (the
// oracle, the CPU append and the CUDA append kernel all use this header).
//
// Tables cos/sin are (seqlen_ro, rotary_dim / 2): row `pos` holds cos/sin(pos * theta_i) for the
// rotary_dim / 2 frequencies (half width, not the duplicated cat(freqs, freqs) tables of HF).
// Dimension pair i (i < rotary_dim / 2) of a row rotates by angle theta_i of its position:
//   interleaved (GPT-J):          elements (2i, 2i + 1)
//   not interleaved (NeoX/Llama): elements (i, i + rotary_dim / 2)
//   x0' = x0 cos - x1 sin,  x1' = x0 sin + x1 cos
// Dimensions past rotary_dim pass through unchanged.
//
// Positions (flash_attn): the new key j of sequence b sits at buffer slot cache_seqlens[b] + j,
// which is its position (an absolute slot: left padding counts). Query i is at cache_seqlens[b] + i
// when the mask is causal or windowed (the queries are the new tokens), else every query of the
// sequence is at cache_seqlens[b].
#pragma once

#include <cstdint>

#include "core/host_device.h"

namespace flashattn {

struct RotaryPair {
  int first, second;  // element indices within the row
};

FA_HOST_DEVICE RotaryPair rotary_pair(int i, int rotary_dim, bool interleaved) {
  return interleaved ? RotaryPair{2 * i, 2 * i + 1} : RotaryPair{i, i + rotary_dim / 2};
}

template <typename T>
FA_HOST_DEVICE void rotate(T& x0, T& x1, T cos_v, T sin_v) {
  const T a = x0 * cos_v - x1 * sin_v;
  const T b = x0 * sin_v + x1 * cos_v;
  x0 = a;
  x1 = b;
}

// The table row of query i of a sequence whose cache held `cache_len` tokens before the call.
FA_HOST_DEVICE int64_t rotary_query_position(int64_t cache_len, int64_t i, bool per_query) {
  return per_query ? cache_len + i : cache_len;
}

}  // namespace flashattn
