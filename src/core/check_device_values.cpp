// The checking mode for index values that live on the GPU (issue 10 item 9): cu_seqlens, seqused_k,
// cache_seqlens, cache_batch_idx, cache_leftpad and page tables. By default they are trusted, as
// flash_attn trusts them: reading them would synchronise the host with the device on every call,
// and the kernels never touch memory outside the tensors whatever the values are (they clamp or
// skip rows), so a bad value gives a wrong answer, not a crash. With FLASHATTN_CHECK_LENGTHS=1 in the
// environment (read once) or set_check_lengths(true), every CUDA call first copies those values to
// the host in ONE device-to-host copy (packed on the device), one synchronisation, and runs the CPU
// backend's value checks on them: a bad value raises the named flashattn::Error before any write.
#include <atomic>
#include <vector>

#include "core/check_device_values.h"
#include "core/checks.h"
#include "core/knobs.h"
#include "cuda/backend.h"

namespace flashattn {
namespace {

// The environment's default (core/knobs.h), overridden in-process by set_check_lengths.
std::atomic<int>& mode() {
  static std::atomic<int> m{knobs().check_lengths ? 1 : 0};
  return m;
}

}  // namespace

void set_check_lengths(bool on) { mode().store(on ? 1 : 0); }
bool check_lengths() { return mode().load() != 0; }

namespace core {
namespace {

// The index arrays of a call and where their host copies go.
struct Gather {
  std::vector<const int32_t*> sources;
  std::vector<int64_t> counts;
  std::vector<int32_t> host;

  // Registers `count` int32 at `device_ptr`; returns its offset into `host`.
  int64_t add(const int32_t* device_ptr, int64_t count) {
    int64_t offset = 0;
    for (int64_t c : counts) offset += c;
    sources.push_back(device_ptr);
    counts.push_back(count);
    return offset;
  }

  void copy(const AttnParams& p) {
    int64_t total = 0;
    for (int64_t c : counts) total += c;
    host.resize(size_t(total));
#if FLASHATTN_WITH_CUDA
    cuda::gather_to_host(sources, counts, host.data(), p.device.index, p.stream);
#else
    (void)p;
#endif
  }
  const int32_t* at(int64_t offset) const { return host.data() + offset; }
};

// Redirects p's index pointers to their host copies (p becomes a host-memory description for the
// value checks; its tensor pointers are not used by them).
void gather(AttnParams& p, Gather& g, std::vector<int64_t>& offsets) {
  const int64_t rows = p.page_table ? (p.kv_batch_idx ? p.kv_rows : p.batch) : 0;
  offsets = {p.cu_seqlens_q ? g.add(p.cu_seqlens_q, p.batch + 1) : -1,
             p.cu_seqlens_k ? g.add(p.cu_seqlens_k, p.batch + 1) : -1,
             p.seqused_k ? g.add(p.seqused_k, p.batch) : -1,
             p.seqused_q ? g.add(p.seqused_q, p.batch) : -1,
             p.kv_batch_idx ? g.add(p.kv_batch_idx, p.batch) : -1,
             p.k_leftpad ? g.add(p.k_leftpad, p.batch) : -1,
             // The table's rows as laid out (row stride >= pages_per_seq): the whole span.
             p.page_table ? g.add(p.page_table, rows > 0 ? (rows - 1) * p.page_table_stride + p.pages_per_seq : 0)
                          : -1};
}

void redirect(AttnParams& p, const Gather& g, const std::vector<int64_t>& o) {
  p.device = Device::cpu();
  if (o[0] >= 0) p.cu_seqlens_q = g.at(o[0]);
  if (o[1] >= 0) p.cu_seqlens_k = g.at(o[1]);
  if (o[2] >= 0) p.seqused_k = g.at(o[2]);
  if (o[3] >= 0) p.seqused_q = g.at(o[3]);
  if (o[4] >= 0) p.kv_batch_idx = g.at(o[4]);
  if (o[5] >= 0) p.k_leftpad = g.at(o[5]);
  if (o[6] >= 0) p.page_table = g.at(o[6]);
}

bool has_device_values(const AttnParams& p) {
  return p.cu_seqlens_q || p.cu_seqlens_k || p.seqused_k || p.seqused_q || p.kv_batch_idx || p.k_leftpad ||
         p.page_table;
}

}  // namespace

void check_device_values(const AttnParams& params) {
  if (params.device.kind == DeviceKind::cpu || !check_lengths() || !has_device_values(params)) return;
  AttnParams p = params;
  Gather g;
  std::vector<int64_t> offsets;
  gather(p, g, offsets);
  g.copy(p);
  redirect(p, g, offsets);
  if (p.cu_seqlens_q) check_cu_seqlens_values(p.cu_seqlens_q, "cu_seqlens_q", p.batch, p.total_q, int(p.seqlen_q), "max_seqlen_q");
  if (p.cu_seqlens_k) check_cu_seqlens_values(p.cu_seqlens_k, "cu_seqlens_k", p.batch, p.total_k, int(p.seqlen_k), "max_seqlen_k");
  if (p.seqused_k) check_seqused_k_values(p);
  if (p.seqused_q) check_seqused_q_values(p);
  check_page_ids(p, "page_table");
}

void check_device_values(const KVCacheParams& params) {
  if (params.attn.device.kind == DeviceKind::cpu || !check_lengths() || !has_device_values(params.attn)) return;
  KVCacheParams kp = params;
  Gather g;
  std::vector<int64_t> offsets;
  gather(kp.attn, g, offsets);
  g.copy(kp.attn);
  redirect(kp.attn, g, offsets);
  if (offsets[2] >= 0) kp.cache_seqlens = kp.attn.seqused_k;  // cache_seqlens is the attention's seqused_k
  check_kvcache_values(kp);
}

}  // namespace core
}  // namespace flashattn
