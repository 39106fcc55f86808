#include "core/validate.h"

#include "core/checks.h"
#include "core/overlap.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace flashattn::core {


std::string str(int64_t v) { return std::to_string(v); }

std::string shape_of(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    s += (first ? "" : ", ") + str(d);
    first = false;
  }
  return s + "]";
}

// A null pointer is fine for a tensor with no elements (torch hands one out for an empty cache):
// no backend reads or writes an element that is not there.
void check_defined(const Tensor& t, const char* name) {
  if (t.rank < 1 || t.rank > Tensor::kMaxRank)
    throw Error(name, "a rank between 1 and 6", str(t.rank));
  bool has_elements = true;
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] < 0)
      throw Error(name, "non-negative sizes", t.shape_string());
    if (t.stride[i] < 0)
      throw Error(name, "non-negative strides", "stride " + str(t.stride[i]) + " in dim " + str(i));
    has_elements = has_elements && t.shape[i] > 0;
  }
  if (!t.data && has_elements) throw Error(name, "a non-null data pointer", "null");
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  if (addr % dtype_size(t.dtype) != 0)
    throw Error(name, "a pointer aligned to " + str(dtype_size(t.dtype)) + " bytes (its element size)",
                "address " + std::to_string(addr));
}

// A size that becomes an int field must fit one: 2^32 + 4 heads truncated to 4 would pass every
// later check and silently compute something else.
int int_size(int64_t v, const char* name, const char* what) {
  if (v > INT32_MAX) throw Error(name, std::string(what) + " below 2^31", str(v));
  return static_cast<int>(v);
}

void check_rank(const Tensor& t, const char* name, int rank, const char* layout) {
  if (t.rank != rank)
    throw Error(name, "rank " + str(rank) + " " + layout, "rank " + str(t.rank) + " " + t.shape_string());
}

void check_shape(const Tensor& t, const char* name, std::initializer_list<int64_t> dims,
                 const char* layout) {
  check_rank(t, name, static_cast<int>(dims.size()), layout);
  int i = 0;
  for (int64_t d : dims) {
    if (t.shape[i] != d)
      throw Error(name, std::string("shape ") + shape_of(dims) + " " + layout, t.shape_string());
    ++i;
  }
}

void check_dtype(const Tensor& t, const char* name, DType want, const char* why) {
  if (t.dtype != want)
    throw Error(name, std::string(dtype_name(want)) + " " + why, dtype_name(t.dtype));
}

void check_device(const Tensor& t, const char* name, Device want) {
  if (!(t.device == want))
    throw Error(name, "device " + device_name(want) + " (the device of q)", device_name(t.device));
}

void check_last_contiguous(const Tensor& t, const char* name) {
  if (t.shape[t.rank - 1] > 1 && t.stride[t.rank - 1] != 1)
    throw Error(name, "a contiguous last dimension (stride 1)", "stride " + str(t.stride[t.rank - 1]));
}

// A (row, head, dim) or (batch, row, head, dim) tensor's strides.
Strides strides_of(const Tensor& t, bool varlen) {
  if (varlen) return Strides{0, t.stride[0], t.stride[1]};
  return Strides{t.stride[0], t.stride[1], t.stride[2]};
}

void check_compute_dtype(const Tensor& q, Device device) {
  if (q.dtype == DType::i32)
    throw Error("q", "fp32, fp16 or bf16", dtype_name(q.dtype));
  if (device.kind == DeviceKind::cuda && q.dtype == DType::f32)
    throw Error("q", "fp16 or bf16 on CUDA (fp32 runs on the CPU backend)", "fp32");
}

void check_cu_seqlens(const Tensor& cu, const char* name, int batch, int64_t total_rows,
                      int max_seqlen, const char* max_name, Device device) {
  check_defined(cu, name);
  check_dtype(cu, name, DType::i32, "(cumulative sequence lengths)");
  check_device(cu, name, device);
  check_rank(cu, name, 1, "(batch + 1)");
  if (cu.shape[0] != batch + 1)
    throw Error(name, "length batch + 1 = " + str(batch + 1), str(cu.shape[0]));
  if (cu.stride[0] != 1 && cu.shape[0] > 1)
    throw Error(name, "a contiguous tensor", "stride " + str(cu.stride[0]));
  // The values can only be read where they live; on CUDA they are trusted (reading them would
  // force a host synchronisation), as flash_attn does, unless FLASHATTN_CHECK_LENGTHS asks
  // (core/check_device_values.cpp).
  if (device.kind != DeviceKind::cpu) return;
  check_cu_seqlens_values(static_cast<const int32_t*>(cu.data), name, batch, total_rows, max_seqlen, max_name);
}

void check_cu_seqlens_values(const int32_t* c, const char* name, int batch, int64_t total_rows, int max_seqlen,
                             const char* max_name) {
  if (c[0] != 0) throw Error(name, "first value 0", str(c[0]));
  for (int b = 0; b < batch; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    if (len < 0)
      throw Error(name, "non-decreasing values", str(c[b]) + " then " + str(c[b + 1]) + " at index " + str(b));
    if (len > max_seqlen)
      throw Error(max_name, ">= every sequence length (" + str(len) + " at index " + str(b) + ")", str(max_seqlen));
  }
  if (c[batch] > total_rows)
    throw Error(name, "last value <= the number of packed rows (" + str(total_rows) + ")", str(c[batch]));
}

void check_index_vector(const Tensor& t, const char* name, int64_t length, Device device, const char* what) {
  check_defined(t, name);
  check_dtype(t, name, DType::i32, what);
  check_device(t, name, device);
  check_rank(t, name, 1, "(batch)");
  if (t.shape[0] != length) throw Error(name, "length batch = " + str(length), t.shape_string());
  if (t.stride[0] != 1 && t.shape[0] > 1) throw Error(name, "a contiguous tensor", "stride " + str(t.stride[0]));
}

// seqused_k: int32 (batch); on the CPU every value within its sequence's keys.
void check_seqused_k(const Options& o, AttnParams& p) {
  if (!o.seqused_k) return;
  const Tensor& t = *o.seqused_k;
  check_index_vector(t, "seqused_k", p.batch, p.device, "(keys used per sequence)");
  p.seqused_k = static_cast<const int32_t*>(t.data);
  if (p.device.kind != DeviceKind::cpu) return;  // on CUDA the values are trusted, as cu_seqlens are
  check_seqused_k_values(p);
}

void check_seqused_k_values(const AttnParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    // A paged sequence may use its whole page-table row; a packed one its own keys.
    const int64_t keys = p.page_table    ? p.page_table_capacity()
                         : p.cu_seqlens_k ? int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b]
                                          : p.seqlen_k;
    if (p.seqused_k[b] < 0 || p.seqused_k[b] > keys)
      throw Error("seqused_k", "values in [0, " + str(keys) + "] (the keys of sequence " + str(b) + ")",
                  str(p.seqused_k[b]) + " at index " + str(b));
  }
}

// seqused_q: int32 (batch); on the CPU every value within its sequence's rows.
void check_seqused_q(const Options& o, AttnParams& p) {
  if (!o.seqused_q) return;
  check_index_vector(*o.seqused_q, "seqused_q", p.batch, p.device, "(query rows used per sequence)");
  p.seqused_q = static_cast<const int32_t*>(o.seqused_q->data);
  if (p.device.kind == DeviceKind::cpu) check_seqused_q_values(p);
}

void check_seqused_q_values(const AttnParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int64_t rows = p.cu_seqlens_q ? int64_t(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b] : p.seqlen_q;
    if (p.seqused_q[b] < 0 || p.seqused_q[b] > rows)
      throw Error("seqused_q", "values in [0, " + str(rows) + "] (the query rows of sequence " + str(b) + ")",
                  str(p.seqused_q[b]) + " at index " + str(b));
  }
}

// sinks: fp32 (heads), one logit per query head (core/sink.h).
void check_sinks(const Options& o, AttnParams& p) {
  if (!o.sinks) return;
  const Tensor& t = *o.sinks;
  check_defined(t, "sinks");
  check_dtype(t, "sinks", DType::f32, "(one sink logit per head)");
  check_device(t, "sinks", p.device);
  check_rank(t, "sinks", 1, "(heads)");
  if (t.shape[0] != p.heads) throw Error("sinks", "shape [heads] = [" + str(p.heads) + "]", t.shape_string());
  if (t.stride[0] != 1 && t.shape[0] > 1) throw Error("sinks", "a contiguous tensor", "stride " + str(t.stride[0]));
  p.sinks = static_cast<const float*>(t.data);
}

void check_alibi(const Options& o, AttnParams& p) {
  if (!o.alibi_slopes) return;
  const Tensor& a = *o.alibi_slopes;
  check_defined(a, "alibi_slopes");
  check_dtype(a, "alibi_slopes", DType::f32, "(one slope per head)");
  check_device(a, "alibi_slopes", p.device);
  if (a.rank == 1) {
    if (a.shape[0] != p.heads) throw Error("alibi_slopes", "shape [heads] = [" + str(p.heads) + "]", a.shape_string());
    p.alibi_batch_stride = 0;
  } else if (a.rank == 2) {
    if (a.shape[0] != p.batch || a.shape[1] != p.heads)
      throw Error("alibi_slopes", "shape [batch, heads] = " + shape_of({p.batch, p.heads}), a.shape_string());
    p.alibi_batch_stride = a.stride[0];
  } else {
    throw Error("alibi_slopes", "rank 1 [heads] or rank 2 [batch, heads]", a.shape_string());
  }
  check_last_contiguous(a, "alibi_slopes");
  p.alibi_slopes = static_cast<const float*>(a.data);
}

void check_operands(AttnParams& p, Operand q, Operand k, Operand v) {
  for (const Operand& x : {q, k, v}) check_defined(x.tensor, x.name);
  p.device = q.tensor.device;
  p.dtype = q.tensor.dtype;
  check_compute_dtype(q.tensor, p.device);
  for (const Operand& x : {q, k, v}) check_rank(x.tensor, x.name, x.rank, x.layout);
  for (const Operand& x : {k, v}) check_dtype(x.tensor, x.name, p.dtype, "(the dtype of q)");
  for (const Operand& x : {k, v}) check_device(x.tensor, x.name, p.device);
  for (const Operand& x : {q, k, v}) check_last_contiguous(x.tensor, x.name);
}

void set_heads(AttnParams& p, const Tensor& q, int o, const Tensor& k, const char* k_name, const Tensor& v,
               const char* v_name, int ko) {
  p.heads = int_size(q.shape[o + 2], "q", "a head count");
  p.head_dim = int_size(q.shape[o + 3], "q", "a head_dim");
  p.heads_k = int_size(k.shape[ko + 2], k_name, "a head count");
  p.head_dim_v = int_size(v.shape[ko + 3], v_name, "a head_dim_v");
  if (p.heads < 1) throw Error("q", "at least one head", q.shape_string());
  if (p.heads_k < 1) throw Error(k_name, "at least one head", k.shape_string());
  if (p.heads % p.heads_k != 0)
    throw Error(k_name, "a head count dividing the " + str(p.heads) + " query heads (GQA/MQA)", str(p.heads_k));
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim)
    throw Error("q", "head_dim between 1 and " + str(kMaxHeadDim), str(p.head_dim));
  if (p.head_dim_v < 1 || p.head_dim_v > kMaxHeadDim)
    throw Error(v_name, "head_dim_v between 1 and " + str(kMaxHeadDim), str(p.head_dim_v));
  if (k.shape[ko + 3] != p.head_dim)
    throw Error(k_name, "head_dim " + str(p.head_dim) + " (that of q)", k.shape_string());
}

void check_options(const Options& o, AttnParams& p) {
  if (o.softmax_scale) {
    if (!std::isfinite(*o.softmax_scale))
      throw Error("softmax_scale", "a finite number", std::to_string(*o.softmax_scale));
    p.scale = *o.softmax_scale;
  } else {
    p.scale = p.head_dim > 0 ? 1.0f / std::sqrt(float(p.head_dim)) : 1.0f;
  }
  if (!(o.softcap >= 0.0f) || !std::isfinite(o.softcap))
    throw Error("softcap", "0 (off) or a positive finite number", std::to_string(o.softcap));
  if (o.window_left < -1) throw Error("window_left", "-1 (unbounded) or >= 0", str(o.window_left));
  if (o.window_right < -1) throw Error("window_right", "-1 (unbounded) or >= 0", str(o.window_right));
  if (o.num_threads < 0) throw Error("num_threads", ">= 0 (0 = default)", str(o.num_threads));
  if (o.num_splits < 0) throw Error("num_splits", ">= 0 (0 = heuristic)", str(o.num_splits));
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  p.window_right = o.causal ? 0 : o.window_right;
  if (o.causal && o.window_right > 0)
    throw Error("window_right", "-1 or 0 with causal=true (causal ends the window on the diagonal)",
                str(o.window_right));
  p.deterministic = o.deterministic;
  p.num_threads = o.num_threads;
  p.num_splits = o.num_splits;
  p.stream = o.stream;
  check_alibi(o, p);
  check_seqused_k(o, p);
  check_seqused_q(o, p);
  check_sinks(o, p);
}

// Checks an output-like tensor against the shape its input defines.
void check_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name,
                DType dtype, Device device) {
  check_defined(t, name);
  if (t.rank != like.rank)
    throw Error(name, std::string("the shape of ") + like_name + " " + like.shape_string(), t.shape_string());
  for (int i = 0; i < t.rank; ++i)
    if (t.shape[i] != like.shape[i])
      throw Error(name, std::string("the shape of ") + like_name + " " + like.shape_string(), t.shape_string());
  check_dtype(t, name, dtype, "(the dtype of q)");
  check_device(t, name, device);
  check_last_contiguous(t, name);
}

// A default Tensor{} (no data, rank 0): the caller wants no LSE; p.lse stays null and the kernels
// skip its stores.
bool lse_omitted(const Tensor& lse) { return lse.rank == 0 && lse.data == nullptr; }

void check_lse(const Tensor& lse, AttnParams& p, bool varlen) {
  if (lse_omitted(lse)) return;
  check_defined(lse, "lse");
  check_dtype(lse, "lse", DType::f32, "(log-sum-exp is always fp32)");
  check_device(lse, "lse", p.device);
  if (varlen) {
    check_shape(lse, "lse", {p.heads, p.total_q}, "(heads, total_q)");
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride[0];
  } else {
    check_shape(lse, "lse", {p.batch, p.heads, p.seqlen_q}, "(batch, heads, seqlen_q)");
    p.lse_batch_stride = lse.stride[0];
    p.lse_head_stride = lse.stride[1];
  }
  check_last_contiguous(lse, "lse");
  p.lse = static_cast<float*>(lse.data);
}

void check_no_overlap(std::initializer_list<Named> outputs, std::initializer_list<Named> others) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const Named& other : others)
      if (may_overlap(*o->tensor, *other.tensor))
        throw Error(o->name, std::string("memory that does not overlap ") + other.name,
                    "views that share memory");
    for (auto later = o + 1; later != outputs.end(); ++later)
      if (may_overlap(*o->tensor, *later->tensor))
        throw Error(later->name, std::string("memory that does not overlap ") + o->name,
                    "views that share memory");
  }
}

AttnParams check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options,
                        const VarlenLayout* layout) {
  const bool varlen = layout != nullptr;
  const bool paged = varlen && layout->page_table.has_value();
  const char* q_layout = varlen ? "(total_q, heads, head_dim)" : "(batch, seqlen_q, heads, head_dim)";
  const char* k_layout = paged    ? "(num_pages, page_size, heads_k, head_dim) (a paged cache)"
                         : varlen ? "(total_k, heads_k, head_dim)"
                                  : "(batch, seqlen_k, heads_k, head_dim)";
  const char* v_layout = paged    ? "(num_pages, page_size, heads_k, head_dim_v) (a paged cache)"
                         : varlen ? "(total_k, heads_k, head_dim_v)"
                                  : "(batch, seqlen_k, heads_k, head_dim_v)";
  AttnParams p;
  const int kv_rank = varlen && !paged ? 3 : 4;
  check_operands(p, {q, "q", varlen ? 3 : 4, q_layout}, {k, "k", kv_rank, k_layout}, {v, "v", kv_rank, v_layout});

  const int o = varlen ? -1 : 0;  // dimension offset: varlen tensors have no batch dimension
  const int ko = paged ? 0 : o;   // a paged cache's leading dimension is its pages
  set_heads(p, q, o, k, "k", v, "v", ko);
  if (v.shape[ko + 2] != p.heads_k)
    throw Error("v", str(p.heads_k) + " heads (those of k)", v.shape_string());
  if (v.shape[ko + 1] != k.shape[ko + 1])
    throw Error("v", (paged ? "the page size of k (" : "the sequence length of k (") + str(k.shape[ko + 1]) + ")",
                v.shape_string());
  if (paged && v.shape[0] != k.shape[0])
    throw Error("v", "the page count of k (" + str(k.shape[0]) + ")", v.shape_string());

  if (varlen) {
    check_defined(layout->cu_seqlens_q, "cu_seqlens_q");
    check_rank(layout->cu_seqlens_q, "cu_seqlens_q", 1, "(batch + 1)");
    if (layout->cu_seqlens_q.shape[0] < 1)
      throw Error("cu_seqlens_q", "length batch + 1 >= 1", layout->cu_seqlens_q.shape_string());
    p.batch = int_size(layout->cu_seqlens_q.shape[0] - 1, "cu_seqlens_q", "a batch size");
    if (layout->max_seqlen_q < 0) throw Error("max_seqlen_q", ">= 0", str(layout->max_seqlen_q));
    if (layout->max_seqlen_k < 0) throw Error("max_seqlen_k", ">= 0", str(layout->max_seqlen_k));
    p.total_q = q.shape[0];
    check_cu_seqlens(layout->cu_seqlens_q, "cu_seqlens_q", p.batch, q.shape[0], layout->max_seqlen_q,
                     "max_seqlen_q", p.device);
    // Paged: cu_seqlens_k only gives the lengths (each sequence starts at its first page).
    check_cu_seqlens(layout->cu_seqlens_k, "cu_seqlens_k", p.batch, paged ? INT64_MAX : k.shape[0],
                     layout->max_seqlen_k, "max_seqlen_k", p.device);
    p.cu_seqlens_q = static_cast<const int32_t*>(layout->cu_seqlens_q.data);
    p.cu_seqlens_k = static_cast<const int32_t*>(layout->cu_seqlens_k.data);
    p.total_k = paged ? INT64_MAX : k.shape[0];
    p.seqlen_q = layout->max_seqlen_q;
    p.seqlen_k = layout->max_seqlen_k;
  } else {
    p.batch = int_size(q.shape[0], "q", "a batch size");
    p.seqlen_q = q.shape[1];
    p.seqlen_k = k.shape[1];
    if (k.shape[0] != p.batch) throw Error("k", "batch " + str(p.batch) + " (that of q)", k.shape_string());
    if (v.shape[0] != p.batch) throw Error("v", "batch " + str(p.batch) + " (that of q)", v.shape_string());
    p.total_q = int64_t(p.batch) * p.seqlen_q;
  }
  if (p.seqlen_q > INT32_MAX || p.seqlen_k > INT32_MAX)
    throw Error("q", "sequence lengths below 2^31", str(std::max(p.seqlen_q, p.seqlen_k)));

  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.q_stride = strides_of(q, varlen);
  p.k_stride = strides_of(k, varlen && !paged);
  p.v_stride = strides_of(v, varlen && !paged);
  if (paged) {
    check_page_table(*layout->page_table, "page_table", p.batch, k, p);
    if (p.device.kind == DeviceKind::cpu)
      for (int b = 0; b < p.batch; ++b) {
        const int64_t len = int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
        if (len > p.page_table_capacity())
          throw Error("cu_seqlens_k", "sequence lengths <= the page table's capacity (" +
                      str(p.page_table_capacity()) + " = pages_per_seq * page_size)",
                      str(len) + " at index " + str(b));
      }
  }
  check_options(options, p);
  if (paged) check_page_ids(p, "page_table");
  return p;
}

AttnParams check_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, const Options& options, const VarlenLayout* layout) {
  AttnParams p = check_inputs(q, k, v, options, layout);
  const bool varlen = layout != nullptr;
  check_defined(out, "out");
  if (varlen)
    check_shape(out, "out", {p.total_q, p.heads, p.head_dim_v}, "(total_q, heads, head_dim_v)");
  else
    check_shape(out, "out", {p.batch, p.seqlen_q, p.heads, p.head_dim_v}, "(batch, seqlen_q, heads, head_dim_v)");
  check_dtype(out, "out", p.dtype, "(the dtype of q)");
  check_device(out, "out", p.device);
  check_last_contiguous(out, "out");
  p.out = out.data;
  p.out_stride = strides_of(out, varlen);
  check_lse(lse, p, varlen);
  check_no_overlap({{&out, "out"}, {&lse, "lse"}}, {{&q, "q"}, {&k, "k"}, {&v, "v"}});
  return p;
}

BwdParams check_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                         const Tensor& dv, const Options& options, const VarlenLayout* layout) {
  BwdParams p;
  if (options.seqused_k)
    throw Error("seqused_k", "unset in the backward (it serves decoding with a KV cache, a forward-only use)",
                "a tensor");
  if (options.seqused_q)
    throw Error("seqused_q", "unset in the backward (a forward-only option, as in flash_attn v3)", "a tensor");
  if (layout && layout->page_table)
    throw Error("page_table", "unset in the backward (a paged KV cache serves inference, a forward-only use)",
                "a tensor");
  if (lse_omitted(lse)) throw Error("lse", "the forward's log-sum-exp (the backward reads it)", "an empty Tensor");
  static_cast<AttnParams&>(p) = check_forward(q, k, v, out, lse, options, layout);
  const bool varlen = layout != nullptr;
  check_like(dout, "dout", out, "out", p.dtype, p.device);
  check_like(dq, "dq", q, "q", p.dtype, p.device);
  check_like(dk, "dk", k, "k", p.dtype, p.device);
  check_like(dv, "dv", v, "v", p.dtype, p.device);
  check_no_overlap({{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}},
                   {{&dout, "dout"}, {&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}});
  p.dout = dout.data;
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
  p.dout_stride = strides_of(dout, varlen);
  p.dq_stride = strides_of(dq, varlen);
  p.dk_stride = strides_of(dk, varlen);
  p.dv_stride = strides_of(dv, varlen);
  return p;
}

MergeParams check_merge(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& out,
                        const Tensor& lse, const Options& options) {
  check_defined(partial_out, "partial_out");
  check_defined(partial_lse, "partial_lse");
  check_defined(out, "out");
  check_defined(lse, "lse");
  MergeParams m;
  m.device = partial_out.device;
  check_dtype(partial_out, "partial_out", DType::f32, "(partial outputs are fp32)");
  check_dtype(partial_lse, "partial_lse", DType::f32, "(log-sum-exp is always fp32)");
  check_rank(partial_out, "partial_out", 5, "(splits, batch, seqlen_q, heads, head_dim_v)");
  m.splits = int_size(partial_out.shape[0], "partial_out", "a split count");
  m.batch = int_size(partial_out.shape[1], "partial_out", "a batch size");
  m.seqlen_q = partial_out.shape[2];
  m.heads = int_size(partial_out.shape[3], "partial_out", "a head count");
  m.head_dim_v = int_size(partial_out.shape[4], "partial_out", "a head_dim_v");
  if (m.splits < 1) throw Error("partial_out", "at least one split", partial_out.shape_string());
  check_shape(partial_lse, "partial_lse", {m.splits, m.batch, m.heads, m.seqlen_q}, "(splits, batch, heads, seqlen_q)");
  check_shape(out, "out", {m.batch, m.seqlen_q, m.heads, m.head_dim_v}, "(batch, seqlen_q, heads, head_dim_v)");
  check_shape(lse, "lse", {m.batch, m.heads, m.seqlen_q}, "(batch, heads, seqlen_q)");
  if (out.dtype == DType::i32) throw Error("out", "fp32, fp16 or bf16", dtype_name(out.dtype));
  check_dtype(lse, "lse", DType::f32, "(log-sum-exp is always fp32)");
  check_device(partial_lse, "partial_lse", m.device);
  check_device(out, "out", m.device);
  check_device(lse, "lse", m.device);
  check_last_contiguous(partial_out, "partial_out");
  check_last_contiguous(out, "out");
  if (options.num_threads < 0) throw Error("num_threads", ">= 0 (0 = default)", str(options.num_threads));
  check_no_overlap({{&out, "out"}, {&lse, "lse"}}, {{&partial_out, "partial_out"}, {&partial_lse, "partial_lse"}});

  m.partial_out = static_cast<const float*>(partial_out.data);
  m.po_split_stride = partial_out.stride[0];
  m.po_batch_stride = partial_out.stride[1];
  m.po_row_stride = partial_out.stride[2];
  m.po_head_stride = partial_out.stride[3];
  m.partial_lse = static_cast<const float*>(partial_lse.data);
  m.pl_split_stride = partial_lse.stride[0];
  m.pl_batch_stride = partial_lse.stride[1];
  m.pl_head_stride = partial_lse.stride[2];
  m.pl_row_stride = partial_lse.stride[3];
  m.out_dtype = out.dtype;
  m.out = out.data;
  m.out_stride = Strides{out.stride[0], out.stride[1], out.stride[2]};
  m.lse = static_cast<float*>(lse.data);
  m.lse_batch_stride = lse.stride[0];
  m.lse_head_stride = lse.stride[1];
  m.lse_row_stride = lse.stride[2];
  m.num_threads = options.num_threads;
  m.stream = options.stream;
  return m;
}

}  // namespace flashattn::core
