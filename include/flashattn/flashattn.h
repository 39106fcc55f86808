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

#include <optional>

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
  // A paged KV cache (forward only): k/v are (num_pages, page_size, heads_k, d) and sequence b's
  // key j lives in page page_table[b][j / page_size], row j % page_size. int32 (batch,
  // pages_per_seq). Sequence b has cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys (or seqused_k[b]);
  // its keys start at row 0 of its first page.
  std::optional<Tensor> page_table;
};

void forward_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& lse, const VarlenLayout& layout, const Options& options = {});

void backward_varlen(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                     const Tensor& dv, const VarlenLayout& layout, const Options& options = {});

// A KV cache for inference (flash_attn_with_kvcache). Dense: k_cache/v_cache (batch_cache,
// capacity, heads_k, d / d_v). Paged (page_table given): (num_pages, page_size, heads_k, d / d_v),
// any page_size >= 1, capacity = pages_per_seq * page_size. Sequence b of q uses cache row
// cache_batch_idx[b] (default b) and its keys are the buffer slots [cache_leftpad[b],
// cache_seqlens[b] + seqlen_new): cache_seqlens counts the tokens before this call from slot 0,
// left padding included, and is not advanced by the call (the caller does that).
struct KVCache {
  Tensor k_cache, v_cache;
  std::optional<Tensor> cache_seqlens;    // int32 (batch); unset: every cache row is full (capacity)
  std::optional<Tensor> cache_batch_idx;  // int32 (batch): the cache row of each sequence
  std::optional<Tensor> cache_leftpad;    // int32 (batch): the first valid slot of each sequence
  std::optional<Tensor> page_table;       // int32 (batch_cache, pages_per_seq): page ids
  // Rotary embedding of q and of the new keys (the cached ones are already rotated):
  // (seqlen_ro, rotary_dim / 2) in q's dtype, rotary_dim even and <= head_dim; dims past
  // rotary_dim pass through. Position of new key j: cache_seqlens[b] + j; of query i:
  // cache_seqlens[b] + i when causal or windowed, else cache_seqlens[b] for every query (flash_attn).
  std::optional<Tensor> rotary_cos, rotary_sin;
  // true: pairs (0, 1), (2, 3), ... (GPT-J); false: pairs (i, i + rotary_dim / 2) (GPT-NeoX, Llama).
  bool rotary_interleaved = true;
};

// Appends k_new/v_new (batch, seqlen_new, heads_k, d / d_v) into the cache at slots
// cache_seqlens[b] + j (rotary applied to the keys), then attends q (batch, seqlen_q, heads, d;
// rotated when rotary tables are given, q itself untouched) to the cache's valid keys; causal,
// window and ALiBi align bottom-right on that length. k_new/v_new may be empty Tensor{}s
// (nothing to append; appending needs cache_seqlens). Everything is validated before the first
// write: a rejected call leaves q, the cache and out/lse bitwise unchanged. On the CPU the
// lengths, indices and page ids are checked too; on CUDA they live on the device and are
// trusted (set FLASHATTN_CHECK_LENGTHS=1 to check them with one synchronisation).
void forward_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                     const Tensor& out, const Tensor& lse, const Options& options = {});

// The gradient of the attention sinks (Options::sinks, fp32 (heads)), given the forward's out and
// LSE (which include the sinks) and dout: dsinks[h] = -sum over rows of exp(sinks[h] - LSE) *
// rowsum(dout * out). Fixed-length layout unless `layout` is given (then out/dout are packed and
// lse is (heads, total_q)). dsinks: fp32 (heads), overwritten.
void sink_gradient(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& sinks,
                   const Tensor& dsinks, const VarlenLayout* layout = nullptr, const Options& options = {});

// Combines attention over disjoint key sets (split-KV, cascade, ring attention):
//   partial_out fp32 (splits, batch, seqlen_q, heads, d_v), partial_lse fp32 (splits, batch, heads, seqlen_q)
//   -> out (batch, seqlen_q, heads, d_v) in any float dtype, lse fp32 (batch, heads, seqlen_q).
// LSE = log sum_c exp(LSE_c); O = sum_c exp(LSE_c - LSE) O_c. Splits with LSE_c = -inf contribute nothing.
void merge(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& out,
           const Tensor& lse, const Options& options = {});

// Index values that live on the GPU (cu_seqlens, seqused_k, cache_seqlens, cache_batch_idx,
// cache_leftpad, page tables) are trusted by default: checking them would synchronise the host with
// the device on every call (the kernels stay memory-safe whatever they hold: rows outside the
// tensors are skipped). With the checking mode on, each CUDA call copies them to the host in one
// device-to-host copy (one synchronisation) and raises the same named Error a CPU call would, before
// anything is written. The default comes from FLASHATTN_CHECK_LENGTHS=1 (read once).
void set_check_lengths(bool on);
bool check_lengths();

// What this build and machine offer.
bool cuda_available();
const char* version();

}  // namespace flashattn
