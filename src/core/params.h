// The validated, backend-neutral description of one attention call. Built once by
// core/validate.cpp from the public tensors; every backend reads only this.
// Fixed-length and variable-length batches share it: a fixed batch is the varlen case with
// sequence b starting at b * batch_stride and no cu_seqlens.
#pragma once

#include <cstdint>

#include "core/host_device.h"
#include "core/mask.h"
#include "flashattn/tensor.h"

namespace flashattn {

// Element strides of a (batch, row, head, dim) tensor; dim is contiguous.
struct Strides {
  int64_t batch = 0, row = 0, head = 0;
};

struct AttnParams {
  DType dtype = DType::f32;
  Device device{};

  int batch = 0, heads = 0, heads_k = 0;
  int head_dim = 0, head_dim_v = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // per sequence; the maximum for varlen

  // Varlen: sequence b owns rows [cu[b], cu[b+1]). Null for a fixed batch.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  // Keys sequence b uses: the first seqused_k[b] of its rows (a KV cache filled to that length).
  // Null: all of them. seqlen_k (and cu_seqlens_k) still give where each sequence's rows are.
  const int32_t* seqused_k = nullptr;
  // Query rows sequence b uses (flash_attn v3's seqused_q): the first seqused_q[b]. Null: all.
  const int32_t* seqused_q = nullptr;
  int64_t total_q = 0;  // rows of q in all (varlen), batch * seqlen_q otherwise
  int64_t total_k = 0;  // varlen: rows of k (INT64_MAX for a paged cache); for FLASHATTN_CHECK_LENGTHS

  // KV cache addressing (flash_attn_with_kvcache, paged varlen). All null / 0: k and v are plain
  // (batch, seqlen_k, heads_k, d) or packed tensors.
  // Paged: k/v are (num_pages, page_size, heads_k, d), k_stride.batch is the page stride, and
  // slot s of cache row c lives in page page_table[c * page_table_stride + s / page_size].
  const int32_t* page_table = nullptr;
  int64_t page_table_stride = 0;
  int64_t pages_per_seq = 0;  // the table's second dimension
  int64_t page_size = 0;
  int64_t num_pages = 0;  // page ids lie in [0, num_pages)
  // The cache row of sequence b (cache_batch_idx); null: row b. kv_rows: the rows it may name.
  const int32_t* kv_batch_idx = nullptr;
  int64_t kv_rows = 0;
  // The first valid slot of sequence b (cache_leftpad); null: slot 0. Key j is slot leftpad + j.
  const int32_t* k_leftpad = nullptr;
  // Tokens appended by this call: sequence b's slots end at seqused_k[b] + seqused_k_added
  // (cache_seqlens counts the tokens before the append; no device copy of the sum is needed).
  int64_t seqused_k_added = 0;
  // Attention sinks: fp32 (heads), one logit per head joining each row's softmax denominator
  // (core/sink.h). Null: none.
  const float* sinks = nullptr;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // null: the caller wants no LSE (forward only). Row-contiguous: lse[b * lse_batch + h * lse_head + row_offset + i]
  Strides q_stride, k_stride, v_stride, out_stride;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  float scale = 1.0f;        // softmax scale
  float softcap = 0.0f;      // 0 = off
  int64_t window_left = -1;  // causal folded in (window_right = 0)
  int64_t window_right = -1;
  const float* alibi_slopes = nullptr;  // [b * alibi_batch_stride + h]
  int64_t alibi_batch_stride = 0;

  bool deterministic = false;
  int num_threads = 0;
  int num_splits = 0;
  void* stream = nullptr;

  int group_size() const { return heads / heads_k; }  // query heads per kv head
  // Slots a paged sequence can hold: its page-table row's pages.
  int64_t page_table_capacity() const { return page_table ? pages_per_seq * page_size : 0; }

  FA_HOST_DEVICE int64_t q_begin(int b) const { return cu_seqlens_q ? cu_seqlens_q[b] : 0; }
  FA_HOST_DEVICE int64_t k_begin(int b) const { return cu_seqlens_k ? cu_seqlens_k[b] : 0; }
  FA_HOST_DEVICE int64_t len_q(int b) const {
    if (seqused_q) return seqused_q[b];
    return cu_seqlens_q ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q;
  }
  FA_HOST_DEVICE int64_t k_start(int b) const { return k_leftpad ? k_leftpad[b] : 0; }
  // Keys of sequence b: its used slots past the left padding.
  FA_HOST_DEVICE int64_t len_k(int b) const {
    if (seqused_k) return seqused_k[b] + seqused_k_added - k_start(b);
    return (cu_seqlens_k ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k) - k_start(b);
  }
  FA_HOST_DEVICE Mask mask(int b) const {
    return Mask::make(len_q(b), len_k(b), window_left, window_right);
  }
  FA_HOST_DEVICE ScoreMod score_mod(int b, int h) const {
    return ScoreMod::of(softcap, alibi_slopes, alibi_batch_stride, b, h);
  }
  // Element offset of (sequence b, row i of it, head h) in a tensor with strides s, where row
  // i is relative to the sequence start.
  FA_HOST_DEVICE int64_t q_offset(int b, int64_t i, int h) const {
    return b * q_stride.batch + (q_begin(b) + i) * q_stride.row + h * q_stride.head;
  }
  // The one definition of "row j of sequence b's keys" (j counted from its first valid key), used
  // by every backend and the oracle: the cache row (cache_batch_idx), the left padding, then the
  // slot's page through the page table or its row in a dense/packed tensor. int64 throughout:
  // page * page_stride overflows 32 bits on large caches.
  FA_HOST_DEVICE int64_t kv_row_offset(const Strides& s, int b, int64_t j) const {
    const int64_t row = kv_batch_idx ? kv_batch_idx[b] : b;
    const int64_t slot = k_start(b) + j;
    if (page_table) {
      const int64_t page = page_table[row * page_table_stride + slot / page_size];
      return page * s.batch + (slot % page_size) * s.row;
    }
    return row * s.batch + (k_begin(b) + slot) * s.row;
  }
  FA_HOST_DEVICE int64_t k_offset(int b, int64_t j, int hk) const {
    return kv_row_offset(k_stride, b, j) + hk * k_stride.head;
  }
  FA_HOST_DEVICE int64_t v_offset(int b, int64_t j, int hk) const {
    return kv_row_offset(v_stride, b, j) + hk * v_stride.head;
  }
  // Whether key j of sequence b lies inside the cache: its cache row exists and, paged, its slot is
  // in the page table and names a page of the cache. The validation guarantees it on the CPU; on
  // CUDA the indices are trusted, and the kernels skip a row that fails this rather than touch
  // memory outside the cache.
  FA_HOST_DEVICE bool kv_row_in_cache(int b, int64_t j) const {
    const int64_t row = kv_batch_idx ? kv_batch_idx[b] : b;
    if (kv_batch_idx && (row < 0 || row >= kv_rows)) return false;
    if (!page_table) return true;
    const int64_t slot = k_start(b) + j;
    if (slot < 0 || slot / page_size >= pages_per_seq) return false;
    const int32_t page = page_table[row * page_table_stride + slot / page_size];
    return page >= 0 && page < num_pages;
  }
  // Whether consecutive keys of a sequence lie one row stride apart (kernels may then step a
  // pointer instead of calling k_offset per row).
  FA_HOST_DEVICE bool kv_rows_strided() const { return page_table == nullptr; }
  FA_HOST_DEVICE int64_t out_offset(int b, int64_t i, int h) const {
    return b * out_stride.batch + (q_begin(b) + i) * out_stride.row + h * out_stride.head;
  }
  FA_HOST_DEVICE int64_t lse_offset(int b, int64_t i, int h) const {
    return b * lse_batch_stride + h * lse_head_stride + q_begin(b) + i;
  }
};

struct BwdParams : AttnParams {
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides dout_stride, dq_stride, dk_stride, dv_stride;

  FA_HOST_DEVICE int64_t dout_offset(int b, int64_t i, int h) const {
    return b * dout_stride.batch + (q_begin(b) + i) * dout_stride.row + h * dout_stride.head;
  }
  FA_HOST_DEVICE int64_t dq_offset(int b, int64_t i, int h) const {
    return b * dq_stride.batch + (q_begin(b) + i) * dq_stride.row + h * dq_stride.head;
  }
  FA_HOST_DEVICE int64_t dk_offset(int b, int64_t j, int hk) const {
    return b * dk_stride.batch + (k_begin(b) + j) * dk_stride.row + hk * dk_stride.head;
  }
  FA_HOST_DEVICE int64_t dv_offset(int b, int64_t j, int hk) const {
    return b * dv_stride.batch + (k_begin(b) + j) * dv_stride.row + hk * dv_stride.head;
  }
};

// sink_gradient(): dsinks from the forward's out and LSE (which include the sinks) and dout. The
// out/lse/sinks/varlen fields of AttnParams are the ones in use.
struct SinkGradParams : AttnParams {
  const void* dout = nullptr;
  Strides dout_stride;
  float* dsinks = nullptr;

  FA_HOST_DEVICE int64_t dout_offset(int b, int64_t i, int h) const {
    return b * dout_stride.batch + (q_begin(b) + i) * dout_stride.row + h * dout_stride.head;
  }
};

// merge(): partial (splits, batch, seqlen_q, heads, d_v) fp32 + (splits, batch, heads, seqlen_q)
struct MergeParams {
  Device device{};
  int splits = 0, batch = 0, heads = 0, head_dim_v = 0;
  int64_t seqlen_q = 0;
  const float* partial_out = nullptr;
  const float* partial_lse = nullptr;
  int64_t po_split_stride = 0, po_batch_stride = 0, po_row_stride = 0, po_head_stride = 0;
  int64_t pl_split_stride = 0, pl_batch_stride = 0, pl_head_stride = 0, pl_row_stride = 0;
  DType out_dtype = DType::f32;
  void* out = nullptr;
  Strides out_stride;
  float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;
  // Varlen outputs (the split-KV forward): sequence b's row i lands on packed row cu[b] + i,
  // and rows past its length are skipped. Null: fixed-length rows.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* seqused_q = nullptr;  // rows past seqused_q[b] are skipped (not written)
  // Attention sinks (core/sink.h), fp32 (heads): folded in once, after the splits are combined.
  const float* sinks = nullptr;
  int num_threads = 0;
  void* stream = nullptr;
};

}  // namespace flashattn
