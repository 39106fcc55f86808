// The argument checks every validator shares (core/validate.cpp, core/validate_kvcache.cpp):
// each throws flashattn::Error naming the argument, what was expected and what came.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/kvcache_params.h"
#include "core/params.h"
#include "flashattn/flashattn.h"

namespace flashattn::core {

constexpr int kMaxHeadDim = 256;

std::string str(int64_t v);
std::string shape_of(std::initializer_list<int64_t> dims);
void check_defined(const Tensor& t, const char* name);
int int_size(int64_t v, const char* name, const char* what);
void check_rank(const Tensor& t, const char* name, int rank, const char* layout);
void check_shape(const Tensor& t, const char* name, std::initializer_list<int64_t> dims, const char* layout);
void check_dtype(const Tensor& t, const char* name, DType want, const char* why);
void check_device(const Tensor& t, const char* name, Device want);
void check_last_contiguous(const Tensor& t, const char* name);
Strides strides_of(const Tensor& t, bool varlen);
void check_compute_dtype(const Tensor& q, Device device);
// An int32 (length) vector of per-sequence values, contiguous, on `device`.
void check_index_vector(const Tensor& t, const char* name, int64_t length, Device device, const char* what);
void check_options(const Options& o, AttnParams& p);
// q, k, v (or q and the caches) as every attention call takes them: defined, q of a dtype the
// device computes in, each of the rank given, k and v of q's dtype and device, rows contiguous.
// Sets p.device and p.dtype from q.
struct Operand {
  const Tensor& tensor;
  const char* name;
  int rank;
  const char* layout;
};
void check_operands(AttnParams& p, Operand q, Operand k, Operand v);
// Heads and head dims into p: q's from its dims o + 2, o + 3; k's and v's from theirs at ko + 2,
// ko + 3 (k_name / v_name: which arguments they are). GQA needs heads_k to divide heads; head dims
// lie in [1, kMaxHeadDim]; k's head dim is q's.
void set_heads(AttnParams& p, const Tensor& q, int o, const Tensor& k, const char* k_name, const Tensor& v,
               const char* v_name, int ko);
// The value checks of cu_seqlens and seqused_k (host memory): the CPU validation runs them on the
// tensors, FLASHATTN_CHECK_LENGTHS on host copies of CUDA ones.
void check_cu_seqlens_values(const int32_t* cu, const char* name, int batch, int64_t total_rows, int max_seqlen,
                             const char* max_name);
void check_seqused_k_values(const AttnParams& p);
void check_seqused_q_values(const AttnParams& p);
bool lse_omitted(const Tensor& lse);
void check_lse(const Tensor& lse, AttnParams& p, bool varlen);

// Outputs are written while inputs are still being read (and the backward reads out and lse):
// an output must share no memory with any tensor of the call other than itself.
struct Named {
  const Tensor* tensor;
  const char* name;
};
void check_no_overlap(std::initializer_list<Named> outputs, std::initializer_list<Named> others);

// A page table int32 (rows, pages_per_seq) for the paged cache `k` (num_pages, page_size, ...):
// sets p's page fields. rows < 0: any number of rows (cache_batch_idx picks them).
void check_page_table(const Tensor& table, const char* name, int64_t rows, const Tensor& k, AttnParams& p);
// CPU: every page id that sequence b's keys occupy (slots [leftpad, leftpad + len_k)) names a
// page of the cache. Ids past a sequence's length are never read and may hold anything.
void check_page_ids(const AttnParams& p, const char* name);
// forward_kvcache's index values in host memory: lengths against the capacity, left padding, cache
// rows (distinct when appending) and page ids.
void check_kvcache_values(const KVCacheParams& kp);

}  // namespace flashattn::core
