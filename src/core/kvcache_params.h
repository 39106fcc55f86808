// The validated description of one forward_kvcache call (core/validate_kvcache.cpp builds it):
// the append of the new tokens (with rotary) and the attention over the cache that follows.
#pragma once

#include <cstdint>

#include "core/params.h"

namespace flashattn {

struct KVCacheParams {
  // Attention over the cache after the append: k/v are the caches, addressed through
  // AttnParams::kv_row_offset (cache rows, left padding, pages); seqused_k = cache_seqlens and
  // seqused_k_added = seqlen_new. q is the caller's (the backend rotates a copy when rotary).
  AttnParams attn;

  // New tokens (batch, seqlen_new, heads_k, d / d_v); seqlen_new = 0: nothing to append.
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  Strides k_new_stride, v_new_stride;
  int64_t seqlen_new = 0;
  const int32_t* cache_seqlens = nullptr;  // tokens before the append (= attn.seqused_k)

  // Rotary (core/rotary.h); rotary_dim = 0: none. Tables in q's dtype, (seqlen_ro, rotary_dim / 2).
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  int64_t rotary_cos_row_stride = 0, rotary_sin_row_stride = 0;
  int64_t seqlen_ro = 0;
  int rotary_dim = 0;
  bool rotary_interleaved = true;
  bool rotary_per_query = false;  // causal or windowed: query i at cache_seqlens + i

  // The slot offset of new token j of sequence b, as attn's key index (keys count from the left
  // padding): the cache held cache_seqlens[b] slots, leftpad of them padding.
  FA_HOST_DEVICE int64_t new_key_index(int b, int64_t j) const {
    return cache_seqlens[b] - attn.k_start(b) + j;
  }
};

}  // namespace flashattn
