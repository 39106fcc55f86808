// Validation of forward_kvcache (and the page tables of paged varlen calls). Everything is checked
// here, before the backend writes the first byte of the cache: a rejected call leaves q, the cache
// and the outputs untouched. On the CPU the values of the index tensors are checked as well
// (lengths against the capacity, page ids, cache rows, left padding); on CUDA they stay on the
// device and are trusted.
#include <algorithm>
#include <vector>

#include "core/checks.h"
#include "core/validate.h"

namespace flashattn::core {

void check_page_table(const Tensor& table, const char* name, int64_t rows, const Tensor& k, AttnParams& p) {
  check_defined(table, name);
  check_dtype(table, name, DType::i32, "(page ids)");
  check_device(table, name, p.device);
  check_rank(table, name, 2, "(batch, pages_per_seq)");
  if (rows >= 0 && table.shape[0] != rows)
    throw Error(name, "shape [batch = " + str(rows) + ", pages_per_seq]", table.shape_string());
  if (table.shape[1] > 1 && table.stride[1] != 1)
    throw Error(name, "a contiguous last dimension (stride 1)", "stride " + str(table.stride[1]));
  if (k.shape[1] < 1) throw Error("k_cache", "a page size >= 1 (dim 1 of a paged cache)", k.shape_string());
  p.page_table = static_cast<const int32_t*>(table.data);
  p.page_table_stride = table.stride[0];
  p.pages_per_seq = table.shape[1];
  p.page_size = k.shape[1];
  p.num_pages = k.shape[0];
}

void check_page_ids(const AttnParams& p, const char* name) {
  if (p.device.kind != DeviceKind::cpu || !p.page_table) return;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t row = p.kv_batch_idx ? p.kv_batch_idx[b] : b;
    const int64_t len = p.len_k(b);
    if (len <= 0) continue;
    const int64_t first = p.k_start(b) / p.page_size, last = (p.k_start(b) + len - 1) / p.page_size;
    for (int64_t i = first; i <= last; ++i) {
      const int32_t id = p.page_table[row * p.page_table_stride + i];
      if (id < 0 || id >= p.num_pages)
        throw Error(name, "page ids in [0, " + str(p.num_pages) + ") (the pages of the cache) for the slots in use",
                    str(id) + " at [" + str(row) + ", " + str(i) + "]");
    }
  }
}

namespace {

const int32_t* index_data(const std::optional<Tensor>& t) {
  return t ? static_cast<const int32_t*>(t->data) : nullptr;
}

void check_rotary(const KVCache& c, bool appending, KVCacheParams& kp, int64_t capacity) {
  if (!c.rotary_cos && !c.rotary_sin) return;
  const AttnParams& p = kp.attn;
  if (!c.rotary_cos || !c.rotary_sin)
    throw Error(c.rotary_cos ? "rotary_sin" : "rotary_cos", "rotary_cos and rotary_sin together", "only one of them");
  if (!appending)
    throw Error("rotary_cos", "new keys k/v to rotate and append (flash_attn applies rotary only to an append)",
                "no k/v");
  const Tensor& cos = *c.rotary_cos;
  const Tensor& sin = *c.rotary_sin;
  for (auto [t, name] : {std::pair{&cos, "rotary_cos"}, std::pair{&sin, "rotary_sin"}}) {
    check_defined(*t, name);
    check_dtype(*t, name, p.dtype, "(the dtype of q)");
    check_device(*t, name, p.device);
    check_rank(*t, name, 2, "(seqlen_ro, rotary_dim / 2)");
    check_last_contiguous(*t, name);
  }
  if (sin.shape[0] != cos.shape[0] || sin.shape[1] != cos.shape[1])
    throw Error("rotary_sin", "the shape of rotary_cos " + cos.shape_string(), sin.shape_string());
  const int64_t rotary_dim = 2 * cos.shape[1];
  if (rotary_dim < 2 || rotary_dim > p.head_dim)
    throw Error("rotary_cos", "(seqlen_ro, rotary_dim / 2) with 2 <= rotary_dim <= head_dim = " + str(p.head_dim),
                cos.shape_string());
  // flash_attn's rule: the tables cover every slot of the cache (a host check, so the kernels
  // never read past them whatever the device-side lengths are).
  if (cos.shape[0] < capacity)
    throw Error("rotary_cos", "at least " + str(capacity) + " rows (seqlen_ro >= the cache capacity)",
                cos.shape_string());
  kp.rotary_cos = cos.data;
  kp.rotary_sin = sin.data;
  kp.rotary_cos_row_stride = cos.stride[0];
  kp.rotary_sin_row_stride = sin.stride[0];
  kp.seqlen_ro = cos.shape[0];
  kp.rotary_dim = int(rotary_dim);
  kp.rotary_interleaved = c.rotary_interleaved;
  kp.rotary_per_query = p.window_left >= 0 || p.window_right >= 0;
}

}  // namespace

// The values of the index tensors, in host memory (CPU tensors, or FLASHATTN_CHECK_LENGTHS's copies).
void check_kvcache_values(const KVCacheParams& kp) {
  const AttnParams& p = kp.attn;
  const int64_t capacity = p.seqlen_k, cache_rows = p.kv_rows;
  const bool appending = kp.seqlen_new > 0;
  if (p.kv_batch_idx) {
    std::vector<int> seen(size_t(std::max<int64_t>(cache_rows, 0)), -1);
    for (int b = 0; b < p.batch; ++b) {
      const int32_t row = p.kv_batch_idx[b];
      if (row < 0 || row >= cache_rows)
        throw Error("cache_batch_idx", "cache rows in [0, " + str(cache_rows) + ")", str(row) + " at index " + str(b));
      // Two sequences appending into one cache row would race for the same slots.
      if (appending && seen[row] >= 0)
        throw Error("cache_batch_idx", "distinct cache rows when k/v are appended",
                    "row " + str(row) + " at indices " + str(seen[row]) + " and " + str(b));
      seen[row] = b;
    }
  }
  for (int b = 0; b < p.batch; ++b) {
    const int64_t before = kp.cache_seqlens ? kp.cache_seqlens[b] : capacity;
    if (before < 0 || before + kp.seqlen_new > capacity) {
      if (kp.seqlen_new > 0)
        throw Error("cache_seqlens", "lengths in [0, capacity - seqlen_new] = [0, " + str(capacity - kp.seqlen_new) +
                    "] (the appended tokens must fit the cache)", str(before) + " at index " + str(b));
      throw Error("cache_seqlens", "lengths in [0, " + str(capacity) + "] (the cache capacity)",
                  str(before) + " at index " + str(b));
    }
    const int64_t leftpad = p.k_start(b);
    if (leftpad < 0 || leftpad > before)
      throw Error("cache_leftpad", "values in [0, cache_seqlens] = [0, " + str(before) + "]",
                  str(leftpad) + " at index " + str(b));
  }
  check_page_ids(p, "page_table");
}

KVCacheParams check_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                            const Tensor& out, const Tensor& lse, const Options& options) {
  KVCacheParams kp;
  AttnParams& p = kp.attn;
  const bool paged = cache.page_table.has_value();
  const Tensor& kc = cache.k_cache;
  const Tensor& vc = cache.v_cache;
  const char* kc_layout = paged ? "(num_pages, page_size, heads_k, head_dim)" : "(batch_cache, capacity, heads_k, head_dim)";
  const char* vc_layout = paged ? "(num_pages, page_size, heads_k, head_dim_v)" : "(batch_cache, capacity, heads_k, head_dim_v)";
  check_operands(p, {q, "q", 4, "(batch, seqlen_q, heads, head_dim)"}, {kc, "k_cache", 4, kc_layout},
                 {vc, "v_cache", 4, vc_layout});
  p.batch = int_size(q.shape[0], "q", "a batch size");
  p.seqlen_q = q.shape[1];
  set_heads(p, q, 0, kc, "k_cache", vc, "v_cache", 0);
  if (vc.shape[0] != kc.shape[0] || vc.shape[1] != kc.shape[1] || vc.shape[2] != kc.shape[2])
    throw Error("v_cache", std::string("the first three dimensions of k_cache ") + kc.shape_string() + " " + vc_layout,
                vc.shape_string());
  p.k_stride = strides_of(kc, false);
  p.v_stride = strides_of(vc, false);
  p.q = q.data;
  p.k = kc.data;
  p.v = vc.data;
  p.q_stride = strides_of(q, false);
  p.total_q = int64_t(p.batch) * p.seqlen_q;

  // Cache rows: the page table's rows (paged) or the cache's batch dimension.
  int64_t cache_rows = kc.shape[0];
  if (cache.cache_batch_idx) {
    check_index_vector(*cache.cache_batch_idx, "cache_batch_idx", p.batch, p.device, "(the cache row of each sequence)");
    p.kv_batch_idx = index_data(cache.cache_batch_idx);
  }
  if (paged) {
    check_page_table(*cache.page_table, "page_table", cache.cache_batch_idx ? -1 : p.batch, kc, p);
    cache_rows = cache.page_table->shape[0];
  } else if (!cache.cache_batch_idx && kc.shape[0] != p.batch) {
    throw Error("k_cache", "batch " + str(p.batch) + " (that of q; or pass cache_batch_idx)", kc.shape_string());
  }
  p.kv_rows = cache_rows;
  const int64_t capacity = paged ? p.page_table_capacity() : kc.shape[1];
  p.seqlen_k = capacity;
  if (p.seqlen_q > INT32_MAX || capacity > INT32_MAX)
    throw Error("q", "sequence lengths below 2^31", str(std::max(p.seqlen_q, capacity)));
  if (cache.cache_leftpad) {
    check_index_vector(*cache.cache_leftpad, "cache_leftpad", p.batch, p.device, "(the first valid slot of each sequence)");
    p.k_leftpad = index_data(cache.cache_leftpad);
  }
  if (cache.cache_seqlens) {
    check_index_vector(*cache.cache_seqlens, "cache_seqlens", p.batch, p.device, "(tokens in each cache row)");
    kp.cache_seqlens = index_data(cache.cache_seqlens);
  }

  // New tokens.
  const bool appending = k_new.defined() || v_new.defined() || k_new.rank > 0 || v_new.rank > 0;
  if (appending) {
    if (k_new.rank == 0 || v_new.rank == 0)
      throw Error(k_new.rank == 0 ? "k" : "v", "k and v together (the new tokens to append)", "only one of them");
    check_defined(k_new, "k");
    check_defined(v_new, "v");
    check_shape(k_new, "k", {p.batch, k_new.shape[1], p.heads_k, p.head_dim}, "(batch, seqlen_new, heads_k, head_dim)");
    check_shape(v_new, "v", {p.batch, k_new.shape[1], p.heads_k, p.head_dim_v}, "(batch, seqlen_new, heads_k, head_dim_v)");
    check_dtype(k_new, "k", p.dtype, "(the dtype of q)");
    check_dtype(v_new, "v", p.dtype, "(the dtype of q)");
    check_device(k_new, "k", p.device);
    check_device(v_new, "v", p.device);
    check_last_contiguous(k_new, "k");
    check_last_contiguous(v_new, "v");
    if (!cache.cache_seqlens)
      throw Error("cache_seqlens", "the cache lengths where k/v are appended", "none");
    kp.seqlen_new = k_new.shape[1];
    if (kp.seqlen_new > capacity)
      throw Error("k", "at most " + str(capacity) + " new tokens (the cache capacity)", k_new.shape_string());
    kp.k_new = k_new.data;
    kp.v_new = v_new.data;
    kp.k_new_stride = strides_of(k_new, false);
    kp.v_new_stride = strides_of(v_new, false);
  }

  if (options.seqused_k)
    throw Error("seqused_k", "unset in forward_kvcache (the cache's lengths are cache_seqlens)", "a tensor");
  if (options.seqused_q) throw Error("seqused_q", "unset in forward_kvcache (every query row is used)", "a tensor");
  check_options(options, p);
  // The attention's keys: the used slots after the append. Without cache_seqlens every row is full.
  p.seqused_k = kp.cache_seqlens;
  p.seqused_k_added = kp.seqlen_new;
  check_rotary(cache, appending, kp, capacity);

  // Outputs.
  check_defined(out, "out");
  check_shape(out, "out", {p.batch, p.seqlen_q, p.heads, p.head_dim_v}, "(batch, seqlen_q, heads, head_dim_v)");
  check_dtype(out, "out", p.dtype, "(the dtype of q)");
  check_device(out, "out", p.device);
  check_last_contiguous(out, "out");
  p.out = out.data;
  p.out_stride = strides_of(out, false);
  check_lse(lse, p, false);

  // Nothing written may alias what is read: out/lse against everything, the caches (written by
  // the append) against the new tokens, q, the tables and each other.
  const Tensor none{};
  const auto opt = [&](const std::optional<Tensor>& t) -> const Tensor& { return t ? *t : none; };
  check_no_overlap({{&out, "out"}, {&lse, "lse"}},
                   {{&q, "q"}, {&kc, "k_cache"}, {&vc, "v_cache"}, {&k_new, "k"}, {&v_new, "v"},
                    {&opt(cache.cache_seqlens), "cache_seqlens"}, {&opt(cache.page_table), "page_table"},
                    {&opt(cache.rotary_cos), "rotary_cos"}, {&opt(cache.rotary_sin), "rotary_sin"}});
  if (appending)
    check_no_overlap({{&kc, "k_cache"}, {&vc, "v_cache"}},  // (also against each other)
                     {{&q, "q"}, {&k_new, "k"}, {&v_new, "v"}, {&opt(cache.cache_seqlens), "cache_seqlens"},
                      {&opt(cache.cache_batch_idx), "cache_batch_idx"}, {&opt(cache.cache_leftpad), "cache_leftpad"},
                      {&opt(cache.page_table), "page_table"}, {&opt(cache.rotary_cos), "rotary_cos"},
                      {&opt(cache.rotary_sin), "rotary_sin"}});
  if (p.device.kind == DeviceKind::cpu) check_kvcache_values(kp);  // CUDA: trusted (see the top)
  return kp;
}

}  // namespace flashattn::core
