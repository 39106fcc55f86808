// flashattn-bench: times FlashAttention (flashattn::forward/backward) against standard attention
// (flashattn::standard, S and P materialised, BLAS products) on one problem with random inputs,
// and checks both against the fp64 oracle.
//
//   flashattn-bench --device cpu --impl both --batch 1 --heads 16 --seqlen 4096 --head-dim 128
//
// Rates count the exactly visible (query, key) pairs: forward FLOPs = 2 * pairs * (d + d_v) per
// (batch, head), i.e. 4 b h sq sk d without a mask; backward = 2.5x forward (docs/DESIGN.md §6).
// Exit codes: 0 done (an implementation that is unsupported or too big is reported and skipped),
// 1 the run cannot happen here (no CUDA, out of memory), 2 the library rejected the problem,
// other nonzero values: invalid command line (CLI11's).
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/mask.h"
#include "core/validate.h"
#if FLASHATTN_BENCH_CUDA
#include "cuda/backend.h"
#endif
#include "device_memory.h"
#include "flashattn/flashattn.h"
#include "fma_peak.h"
#include "ref/reference.h"
#include "ref/standard.h"

namespace {

using namespace flashattn;
using Json = nlohmann::json;

constexpr uint64_t kSeed = 0x5eed'f1a5'a77e'2024ull;
// Multiply-adds the fp64 oracle may spend on a check (a few seconds at most); larger problems
// are checked on a slice of them.
constexpr double kOracleBudgetMacs = 2e8;

// ---- command line ----------------------------------------------------------------------------

struct Config {
  std::string device_name = "auto";
  std::string impl = "both";
  int batch = 1, heads = 16, kv_heads = -1;  // -1: same as heads
  int64_t seqlen = 1024, seqlen_q = -1, seqlen_k = -1;
  int head_dim = 128;
  std::string dtype_name;  // empty: fp32 on the CPU, bf16 on CUDA
  bool causal = false;
  std::string window = "-1,-1";
  float softcap = 0.0f;
  bool backward = false;
  bool check = true;
  int iters = 3, warmup = 1, threads = 0;
  bool json = false;

  // Resolved after parsing.
  Device device{};
  DType dtype = DType::f32;
  int window_left = -1, window_right = -1;
  int threads_used = 1;

  bool runs(const char* which) const { return impl == "both" || impl == which; }
  int group() const { return heads / std::max(kv_heads, 1); }
};

std::string check_window(const std::string& text) {
  int left = 0, right = 0;
  char tail = 0;
  if (std::sscanf(text.c_str(), "%d,%d%c", &left, &right, &tail) != 2)
    return "expected L,R (two integers, -1 = unbounded), got '" + text + "'";
  return "";
}

// CLI11's own range checks print their bounds as doubles (DBL_MAX spelled out) and reject
// non-numbers in other words; this says both plainly: "expected an integer >= 1, got '0'".
CLI::Validator integer_at_least(long long low) {
  return CLI::Validator(
      [low](std::string& text) -> std::string {
        errno = 0;
        char* end = nullptr;
        const long long v = std::strtoll(text.c_str(), &end, 10);
        if (text.empty() || *end || errno == ERANGE) return "expected an integer, got '" + text + "'";
        if (v < low) return "expected an integer >= " + std::to_string(low) + ", got " + text;
        return "";
      },
      "INT >= " + std::to_string(low));
}

void add_options(CLI::App& app, Config& c) {
  app.add_option("--device", c.device_name, "cpu, cuda or auto (cuda when available)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))->capture_default_str();
  app.add_option("--impl", c.impl, "flash, standard or both")
      ->check(CLI::IsMember({"flash", "standard", "both"}))->capture_default_str();
  app.add_option("--batch", c.batch, "batch size")->check(integer_at_least(0))->capture_default_str();
  app.add_option("--heads", c.heads, "query heads")->check(integer_at_least(0))->capture_default_str();
  app.add_option("--kv-heads", c.kv_heads, "key/value heads (GQA/MQA)")
      ->check(integer_at_least(0))->default_str("heads");
  app.add_option("--seqlen", c.seqlen, "sets both --seqlen-q and --seqlen-k")
      ->check(integer_at_least(0))->capture_default_str();
  app.add_option("--seqlen-q", c.seqlen_q, "query length")->check(integer_at_least(0))->default_str("seqlen");
  app.add_option("--seqlen-k", c.seqlen_k, "key length")->check(integer_at_least(0))->default_str("seqlen");
  app.add_option("--head-dim", c.head_dim, "head dimension")->check(integer_at_least(0))->capture_default_str();
  app.add_option("--dtype", c.dtype_name, "fp32, fp16 or bf16")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}))->default_str("fp32 on cpu, bf16 on cuda");
  app.add_flag("--causal", c.causal, "causal mask (bottom-right aligned)");
  app.add_option("--window", c.window, "sliding window L,R (-1 = unbounded)")
      ->check(check_window)->capture_default_str();
  app.add_option("--softcap", c.softcap, "score softcap (0 = off)")->capture_default_str();
  app.add_flag("--backward", c.backward, "time the backward pass too");
  app.add_flag("--check,!--no-check", c.check, "compare with the fp64 oracle (on by default)");
  app.add_option("--iters", c.iters, "timed iterations")->check(integer_at_least(1))->capture_default_str();
  app.add_option("--warmup", c.warmup, "untimed iterations first")->check(integer_at_least(0))->capture_default_str();
  app.add_option("--threads", c.threads, "CPU threads (0 = all cores)")->check(integer_at_least(0))->capture_default_str();
  app.add_flag("--json", c.json, "one JSON object per line per (impl, pass) instead of the table");
}

// Fills the derived fields. Returns an exit code when the run cannot happen here.
std::optional<int> resolve(Config& c) {
  if (c.seqlen_q < 0) c.seqlen_q = c.seqlen;
  if (c.seqlen_k < 0) c.seqlen_k = c.seqlen;
  if (c.kv_heads < 0) c.kv_heads = c.heads;
  std::sscanf(c.window.c_str(), "%d,%d", &c.window_left, &c.window_right);
  c.threads_used = c.threads > 0 ? c.threads : omp_get_max_threads();
  if (c.threads > omp_get_num_procs())
    std::fprintf(stderr, "flashattn-bench: warning: --threads %d is more than the %d cores here; threads will "
                         "share cores and the timings will suffer\n", c.threads, omp_get_num_procs());

  const bool want_cuda = c.device_name == "cuda" || (c.device_name == "auto" && cuda_available());
  if (want_cuda && !cuda_available()) {
    std::fprintf(stderr, "flashattn-bench: --device cuda, but this build of flashattn %s has no usable "
                         "CUDA device (built without CUDA, or no GPU); use --device cpu\n", version());
    return 1;
  }
  c.device = want_cuda ? Device::cuda(0) : Device::cpu();
  if (c.dtype_name.empty()) c.dtype_name = want_cuda ? "bf16" : "fp32";
  c.dtype = c.dtype_name == "fp16" ? DType::f16 : c.dtype_name == "bf16" ? DType::bf16 : DType::f32;
  return std::nullopt;
}

Options options_of(const Config& c) {
  Options o;
  o.causal = c.causal;
  o.window_left = c.window_left;
  o.window_right = c.window_right;
  o.softcap = c.softcap;
  o.num_threads = c.threads;
  return o;
}

bool on_cpu(const Config& c) { return c.device.kind == DeviceKind::cpu; }

Mask mask_of(const Config& c) {
  return Mask::make(c.seqlen_q, c.seqlen_k, c.window_left, c.causal ? 0 : c.window_right);
}

// ---- problem size ------------------------------------------------------------------------------

int64_t visible_pairs(const Config& c) {
  const Mask mask = mask_of(c);
  int64_t pairs = 0;
  for (int64_t i = 0; i < c.seqlen_q; ++i) pairs += std::max<int64_t>(0, mask.key_end(i) - mask.key_begin(i));
  return pairs;
}

double forward_flops(const Config& c) {
  return 2.0 * c.batch * c.heads * double(visible_pairs(c)) * (c.head_dim + c.head_dim);
}

int64_t physical_memory_bytes() {
  return int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGESIZE));
}

// ---- buffers and inputs ----------------------------------------------------------------------

// A 64-byte aligned allocation on the problem's device (the CPU kernels' vector loads care
// about alignment on the host).
class Buffer {
 public:
  Buffer(size_t bytes, Device device) : device_(device), bytes_(bytes) {
    data_ = bench::device_alloc(bytes, device);
    if (!data_) throw std::bad_alloc();
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { bench::device_free(data_, device_); }
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  Device device_;
  size_t bytes_;
  void* data_ = nullptr;
};

struct TensorBuffer {
  Buffer buffer;
  Tensor tensor;
  TensorBuffer(DType dtype, std::initializer_list<int64_t> shape, Device device)
      : buffer(bytes_of(dtype, shape), device), tensor(Tensor::contiguous(buffer.data(), dtype, shape, device)) {}
  static size_t bytes_of(DType dtype, std::initializer_list<int64_t> shape) {
    size_t n = dtype_size(dtype);
    for (int64_t s : shape) n *= size_t(s);
    return n;
  }
};

struct Tensors {
  TensorBuffer q, k, v, out, lse, dout, dq, dk, dv;
  Tensors(const Config& c, Device device)
      : q(c.dtype, {c.batch, c.seqlen_q, c.heads, c.head_dim}, device),
        k(c.dtype, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim}, device),
        v(c.dtype, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim}, device),
        out(c.dtype, {c.batch, c.seqlen_q, c.heads, c.head_dim}, device),
        lse(DType::f32, {c.batch, c.heads, c.seqlen_q}, device),
        dout(c.dtype, {c.batch, c.seqlen_q, c.heads, c.head_dim}, device),
        dq(c.dtype, {c.batch, c.seqlen_q, c.heads, c.head_dim}, device),
        dk(c.dtype, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim}, device),
        dv(c.dtype, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim}, device) {}
};

// Where the implementations run (`run`) and the host copy the oracle reads (`host`): the same
// tensors on the CPU; on a GPU, inputs are copied over once and outputs back after each pass.
struct Problem {
  Device device;
  Tensors host;
  std::optional<Tensors> on_device;

  Problem(const Config& c) : device(c.device), host(c, Device::cpu()) {
    if (device.kind != DeviceKind::cpu) on_device.emplace(c, device);
  }
  const Tensors& run() const { return on_device ? *on_device : host; }

  void inputs_to_device(bool backward) const {
    if (!on_device) return;
    std::vector<TensorBuffer Tensors::*> inputs{&Tensors::q, &Tensors::k, &Tensors::v};
    if (backward) inputs.push_back(&Tensors::dout);
    for (auto member : inputs)
      bench::copy_to_device(((*on_device).*member).buffer.data(), (host.*member).buffer.data(),
                            (host.*member).buffer.bytes(), device);
  }
  void outputs_to_host(bool backward) const {
    if (!on_device) return;
    for (auto member : outputs(backward))
      bench::copy_to_host((host.*member).buffer.data(), ((*on_device).*member).buffer.data(),
                          (host.*member).buffer.bytes(), device);
  }
  static std::vector<TensorBuffer Tensors::*> outputs(bool backward) {
    if (backward) return {&Tensors::dq, &Tensors::dk, &Tensors::dv};
    return {&Tensors::out, &Tensors::lse};
  }
};

// Standard normal values from a counter-based hash: reproducible and filled in parallel.
float normal_at(uint64_t seed, int64_t index) {
  uint64_t z = seed + uint64_t(index) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const double u1 = (double(z >> 40) + 0.5) / double(1 << 24);
  const double u2 = (double(z & 0xffffff) + 0.5) / double(1 << 24);
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

void fill_normal(const Tensor& t, uint64_t seed, int threads) {
  const int64_t n = t.numel();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) store_from_float(t.data, i, t.dtype, normal_at(seed, i));
}

// NaN everywhere, so an element a kernel forgets to write fails the check: all-ones bytes are
// a NaN in fp32, fp16 and bf16 alike.
void poison(const TensorBuffer& t) { bench::fill_bytes(t.buffer.data(), 0xff, t.buffer.bytes(), t.tensor.device); }

// dout only for a backward run: untouched pages stay out of the process's memory, so a
// forward-only run's peak RSS is the inputs, the outputs and what the kernel allocates.
void fill_inputs(const Tensors& t, bool backward, int threads) {
  fill_normal(t.q.tensor, kSeed + 1, threads);
  fill_normal(t.k.tensor, kSeed + 2, threads);
  fill_normal(t.v.tensor, kSeed + 3, threads);
  if (backward) fill_normal(t.dout.tensor, kSeed + 4, threads);
}

// ---- timing and memory -------------------------------------------------------------------------

struct Timing {
  double median_ms = 0, min_ms = 0;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// "\r[flash fwd] iter 3/10" on stderr when it is a terminal (a log would only collect the
// carriage returns); wiped when the pass is done, so the table stays clean.
void progress(const std::string& label, int done, int total) {
  static const bool tty = isatty(STDERR_FILENO);
  if (!tty) return;
  if (done < total)
    std::fprintf(stderr, "\r[%s] iter %d/%d ", label.c_str(), done + 1, total);
  else
    std::fprintf(stderr, "\r%*s\r", int(label.size()) + 24, "");
  std::fflush(stderr);
}

Timing time_runs(const std::string& label, int warmup, int iters, Device device, const std::function<void()>& fn) {
  const int total = warmup + iters;
  std::vector<double> ms;
  for (int it = 0; it < total; ++it) {
    progress(label, it, total);
    const double start = now_ms();
    fn();
    bench::synchronize(device);
    if (it >= warmup) ms.push_back(now_ms() - start);
  }
  progress(label, total, total);
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  return Timing{n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]), ms.front()};
}

// Bytes of a "VmRSS:"-style field of /proc/self/status; -1 when unreadable.
int64_t proc_status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field, 0) == 0) return std::atoll(line.c_str() + field.size()) * 1024;
  return -1;
}

// The growth of the process's peak resident memory over a section: what an implementation
// allocated beyond the (already resident) inputs and outputs. Linux resets the peak through
// /proc/self/clear_refs; where that fails, the old peak is the baseline.
class PeakRssDelta {
 public:
  PeakRssDelta() {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    clear.flush();
    const bool reset = clear.good();
    baseline_ = reset ? proc_status_bytes("VmRSS:") : proc_status_bytes("VmHWM:");
  }
  int64_t bytes() const {
    const int64_t peak = proc_status_bytes("VmHWM:");
    return peak < 0 || baseline_ < 0 ? -1 : std::max<int64_t>(0, peak - baseline_);
  }

 private:
  int64_t baseline_ = -1;
};

// ---- checking against the fp64 oracle ---------------------------------------------------------

// The part of the problem the oracle recomputes: all of it when that is cheap, else the last
// query rows of the last query heads of the last kv head in the last batch. Taking the last rows
// keeps the bottom-right aligned mask unchanged (row r0 + i of sq sits where row i of sq - r0 does).
struct Slice {
  int b0 = 0, nb = 0, kv0 = 0, nkv = 0, h0 = 0, nh = 0;
  int64_t r0 = 0, nr = 0;
  bool full = true;
  bool kv_grads_exact() const { return full; }  // dK/dV need every query row of their heads
};

Slice choose_slice(const Config& c) {
  const double per_row_head = double(c.seqlen_k) * 2 * c.head_dim;
  Slice s{0, c.batch, 0, c.kv_heads, 0, c.heads, 0, c.seqlen_q, true};
  if (double(c.batch) * c.heads * c.seqlen_q * per_row_head <= kOracleBudgetMacs) return s;
  s.full = false;
  s.b0 = c.batch - 1, s.nb = 1;
  s.kv0 = c.kv_heads - 1, s.nkv = 1;
  s.nh = std::min(c.group(), 2), s.h0 = c.heads - s.nh;  // the last heads read the last kv head
  s.nr = std::clamp<int64_t>(int64_t(kOracleBudgetMacs / (s.nh * per_row_head)), 1, c.seqlen_q);
  s.r0 = c.seqlen_q - s.nr;
  return s;
}

// A (batch, row, head, dim) view narrowed to [b0, b0+nb) x [r0, r0+nr) x [h0, h0+nh).
Tensor narrow(const Tensor& t, int b0, int nb, int64_t r0, int64_t nr, int h0, int nh) {
  const int64_t offset = b0 * t.stride[0] + r0 * t.stride[1] + h0 * t.stride[2];
  return Tensor::strided(static_cast<char*>(t.data) + offset * int64_t(dtype_size(t.dtype)), t.dtype,
                         {nb, nr, nh, t.shape[3]}, {t.stride[0], t.stride[1], t.stride[2], 1}, t.device);
}

struct SliceViews {
  Tensor q, k, v, out, dout, dq, dk, dv;
};

SliceViews slice_views(const Tensors& t, const Slice& s, const Config& c) {
  return SliceViews{narrow(t.q.tensor, s.b0, s.nb, s.r0, s.nr, s.h0, s.nh),
                    narrow(t.k.tensor, s.b0, s.nb, 0, c.seqlen_k, s.kv0, s.nkv),
                    narrow(t.v.tensor, s.b0, s.nb, 0, c.seqlen_k, s.kv0, s.nkv),
                    narrow(t.out.tensor, s.b0, s.nb, s.r0, s.nr, s.h0, s.nh),
                    narrow(t.dout.tensor, s.b0, s.nb, s.r0, s.nr, s.h0, s.nh),
                    narrow(t.dq.tensor, s.b0, s.nb, s.r0, s.nr, s.h0, s.nh),
                    narrow(t.dk.tensor, s.b0, s.nb, 0, c.seqlen_k, s.kv0, s.nkv),
                    narrow(t.dv.tensor, s.b0, s.nb, 0, c.seqlen_k, s.kv0, s.nkv)};
}

struct Errors {
  double max_abs = 0;  // +inf when an element is NaN/inf (unwritten or overflowed)
  double rel = 0;      // max|err| / max|ref|, the worst over the compared tensors

  void merge(const Errors& e) {
    max_abs = std::max(max_abs, e.max_abs);
    rel = std::max(rel, e.rel);
  }
};

// ours: a (nb, rows, heads, dim) view; ref: the oracle's dense (nb * rows, heads, dim) result.
Errors compare(const Tensor& ours, const std::vector<double>& ref) {
  double max_err = 0, max_ref = 0;
  int64_t index = 0;
  for (int64_t b = 0; b < ours.shape[0]; ++b)
    for (int64_t r = 0; r < ours.shape[1]; ++r)
      for (int64_t h = 0; h < ours.shape[2]; ++h)
        for (int64_t d = 0; d < ours.shape[3]; ++d, ++index) {
          const double x = load_as_float(ours.data, b * ours.stride[0] + r * ours.stride[1] + h * ours.stride[2] + d,
                                         ours.dtype);
          const double err = std::isfinite(x) ? std::fabs(x - ref[index]) : std::numeric_limits<double>::infinity();
          max_err = std::max(max_err, err);
          max_ref = std::max(max_ref, std::fabs(ref[index]));
        }
  return Errors{max_err, max_ref > 0 ? max_err / max_ref : max_err};
}

// Outside the slice the oracle cannot vouch for the values, but they must at least exist.
bool all_finite(const Tensor& t) {
  const int64_t n = t.numel();
  bool finite = true;
#pragma omp parallel for reduction(&& : finite) schedule(static)
  for (int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(load_as_float(t.data, i, t.dtype));
  return finite;
}

// The oracle's results for the slice, computed once and shared by the implementations.
class Oracle {
 public:
  Oracle(const Config& c, const Tensors& t) : config_(c), tensors_(t), slice_(choose_slice(c)) {}

  const Slice& slice() const { return slice_; }

  Errors forward_errors() {
    const SliceViews s = slice_views(tensors_, slice_, config_);
    if (!forward_) forward_ = ref::forward(s.q, s.k, s.v, options_of(config_));
    Errors e = compare(s.out, forward_->out);
    if (!all_finite(tensors_.out.tensor)) e.max_abs = e.rel = std::numeric_limits<double>::infinity();
    return e;
  }

  Errors backward_errors() {
    const SliceViews s = slice_views(tensors_, slice_, config_);
    if (!backward_) backward_ = ref::backward(s.dout, s.q, s.k, s.v, options_of(config_));
    Errors e = compare(s.dq, backward_->dq);
    if (slice_.kv_grads_exact()) {
      e.merge(compare(s.dk, backward_->dk));
      e.merge(compare(s.dv, backward_->dv));
    }
    for (const TensorBuffer* g : {&tensors_.dq, &tensors_.dk, &tensors_.dv})
      if (!all_finite(g->tensor)) e.max_abs = e.rel = std::numeric_limits<double>::infinity();
    return e;
  }

 private:
  const Config& config_;
  const Tensors& tensors_;
  Slice slice_;
  std::optional<ref::ForwardResult> forward_;
  std::optional<ref::BackwardResult> backward_;
};

// ---- running the implementations ---------------------------------------------------------------

struct Result {
  std::string impl, pass;
  bool ran = false;
  std::string message;  // why it was skipped
  Timing timing;
  double flops = 0;
  int64_t extra_bytes = -1;
  std::optional<Errors> errors;

  double gflops() const { return ran && timing.median_ms > 0 ? flops / timing.median_ms * 1e-6 : 0; }
  static Result skipped(std::string impl, std::string pass, std::string why) {
    Result r;
    r.impl = std::move(impl), r.pass = std::move(pass), r.message = std::move(why);
    return r;
  }
};

struct Impl {
  const char* name;
  std::function<void(const Tensors&, const Options&)> forward;
  std::function<void(const Tensors&, const Options&)> backward;
  std::function<int64_t(const Tensors&, bool)> extra_bytes;  // nullptr: measure the peak RSS growth
};

Impl flash_impl() {
  return Impl{"flash",
              [](const Tensors& t, const Options& o) {
                flashattn::forward(t.q.tensor, t.k.tensor, t.v.tensor, t.out.tensor, t.lse.tensor, o);
              },
              [](const Tensors& t, const Options& o) {
                flashattn::backward(t.dout.tensor, t.q.tensor, t.k.tensor, t.v.tensor, t.out.tensor,
                                    t.lse.tensor, t.dq.tensor, t.dk.tensor, t.dv.tensor, o);
              },
              nullptr};
}

Impl standard_impl() {
  return Impl{"standard",
              [](const Tensors& t, const Options& o) {
                standard::forward(t.q.tensor, t.k.tensor, t.v.tensor, t.out.tensor, t.lse.tensor, o);
              },
              [](const Tensors& t, const Options& o) {
                standard::backward(t.dout.tensor, t.q.tensor, t.k.tensor, t.v.tensor, t.out.tensor,
                                   t.lse.tensor, t.dq.tensor, t.dk.tensor, t.dv.tensor, o);
              },
              [](const Tensors& t, bool backward) {
                return standard::workspace_bytes(t.q.tensor, t.k.tensor, t.v.tensor, backward);
              }};
}

// Times one pass of one implementation (poisoned outputs, warmup, iterations), then checks it.
// flashattn::Unsupported and out-of-memory skip the pass; flashattn::Error propagates.
Result run_pass(const Impl& impl, bool backward, const Config& c, const Problem& problem, Oracle* oracle) {
  const Tensors& t = problem.run();
  Result r = Result::skipped(impl.name, backward ? "bwd" : "fwd", "");
  r.flops = forward_flops(c) * (backward ? 2.5 : 1.0);
  const Options options = options_of(c);
  const auto& fn = backward ? impl.backward : impl.forward;
  try {
    for (auto member : Problem::outputs(backward)) poison(t.*member);
    PeakRssDelta rss;
    r.timing = time_runs(r.impl + " " + r.pass, c.warmup, c.iters, problem.device, [&] { fn(t, options); });
    // On a GPU the host RSS says nothing about device memory: left unknown (-1) there.
    r.extra_bytes = impl.extra_bytes ? impl.extra_bytes(t, backward) : on_cpu(c) ? rss.bytes() : -1;
    r.ran = true;
    problem.outputs_to_host(backward);
  } catch (const Unsupported& e) {
    r.message = e.what();
    return r;
  } catch (const std::bad_alloc&) {
    r.message = "out of memory";
    return r;
  }
  if (oracle) r.errors = backward ? oracle->backward_errors() : oracle->forward_errors();
  return r;
}

// The backward pass needs this implementation's out and lse; when its forward could not run,
// the other implementation's forward provides them.
bool prepare_backward_inputs(const Impl& impl, const Impl& other, const Config& c, const Problem& problem) {
  for (const Impl* source : {&impl, &other}) {
    try {
      source->forward(problem.run(), options_of(c));
      bench::synchronize(problem.device);
      return true;
    } catch (const Unsupported&) {
    } catch (const std::bad_alloc&) {
    }
  }
  return false;
}

// ---- output ------------------------------------------------------------------------------------

std::string human_bytes(int64_t bytes) {
  if (bytes < 0) return "?";
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  char text[32];
  std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return text;
}


void print_header(const Config& c, const bench::FmaPeak& peak, const Slice& slice) {
  std::printf("flashattn-bench %s | device %s | %d threads | %s\n", version(), device_name(c.device).c_str(),
              c.threads_used, dtype_name(c.dtype));
  std::printf("batch %d, heads %d/%d (q/kv), seqlen %lld/%lld (q/k), head_dim %d | causal %s, window (%d,%d), softcap %g\n",
              c.batch, c.heads, c.kv_heads, (long long)c.seqlen_q, (long long)c.seqlen_k, c.head_dim,
              c.causal ? "yes" : "no", c.window_left, c.window_right, double(c.softcap));
  std::printf("forward %.2f GFLOP per call (visible pairs), backward 2.5x; median of %d iters after %d warmup\n",
              forward_flops(c) * 1e-9, c.iters, c.warmup);
  if (on_cpu(c) && peak.gflops > 0)
    std::printf("CPU fp32 FMA peak (%s, %d threads): %.1f GFLOP/s\n", peak.isa, peak.threads, peak.gflops);
  if (const char* core = std::getenv("OPENBLAS_CORETYPE"))
    std::printf("note: OPENBLAS_CORETYPE=%s is set (it picks the BLAS kernels standard attention uses)\n", core);
  if (c.check && !slice.full)
    std::printf("check: oracle on batch %d, heads %d-%d, the last %lld of %lld query rows%s\n", slice.b0,
                slice.h0, slice.h0 + slice.nh - 1, (long long)slice.nr, (long long)c.seqlen_q,
                c.backward ? " (backward: dQ only)" : "");
  std::printf("\n%-9s %-4s %11s %11s %10s %7s %12s %12s %10s\n", "impl", "pass", "median ms", "min ms",
              on_cpu(c) ? "GFLOP/s" : "TFLOP/s", "% peak", "extra mem", "max abs err", "rel err");
}

void print_row(const Result& r, const Config& c, const bench::FmaPeak& peak) {
  if (!r.ran) {
    std::printf("%-9s %-4s skipped: %s\n", r.impl.c_str(), r.pass.c_str(), r.message.c_str());
    return;
  }
  const double rate = on_cpu(c) ? r.gflops() : r.gflops() * 1e-3;
  char pct[16] = "-";
  if (on_cpu(c) && peak.gflops > 0) std::snprintf(pct, sizeof pct, "%.1f", 100.0 * r.gflops() / peak.gflops);
  char abs_err[24] = "-", rel_err[24] = "-";
  if (r.errors) {
    std::snprintf(abs_err, sizeof abs_err, "%.3e", r.errors->max_abs);
    std::snprintf(rel_err, sizeof rel_err, "%.3e", r.errors->rel);
  }
  std::printf("%-9s %-4s %11.3f %11.3f %10.1f %7s %12s %12s %10s\n", r.impl.c_str(), r.pass.c_str(),
              r.timing.median_ms, r.timing.min_ms, rate, pct, human_bytes(r.extra_bytes).c_str(), abs_err, rel_err);
}

Json finite_or_null(double x) { return std::isfinite(x) ? Json(x) : Json(nullptr); }

void print_json(const Result& r, const Config& c, const bench::FmaPeak& peak) {
  Json j;
  j["device"] = device_name(c.device);
  j["impl"] = r.impl;
  j["pass"] = r.pass;
  j["batch"] = c.batch;
  j["heads"] = c.heads;
  j["kv_heads"] = c.kv_heads;
  j["seqlen_q"] = c.seqlen_q;
  j["seqlen_k"] = c.seqlen_k;
  j["head_dim"] = c.head_dim;
  j["dtype"] = dtype_name(c.dtype);
  j["causal"] = c.causal;
  j["window_left"] = c.window_left;
  j["window_right"] = c.window_right;
  j["softcap"] = c.softcap;
  j["threads"] = c.threads_used;
  j["status"] = r.ran ? "ok" : "skipped";
  if (!r.ran) j["message"] = r.message;
  j["time_ms"] = r.ran ? Json(r.timing.median_ms) : Json(nullptr);
  j["time_min_ms"] = r.ran ? Json(r.timing.min_ms) : Json(nullptr);
  j["gflops"] = r.ran ? Json(r.gflops()) : Json(nullptr);
  j["tflops"] = r.ran ? Json(r.gflops() * 1e-3) : Json(nullptr);
  j["extra_bytes"] = r.ran && r.extra_bytes >= 0 ? Json(r.extra_bytes) : Json(nullptr);
  j["peak_gflops"] = on_cpu(c) && peak.gflops > 0 ? Json(peak.gflops) : Json(nullptr);
  // A NaN/inf error (unwritten output) has no JSON number: null with "check_failed".
  j["max_abs_err"] = r.errors ? finite_or_null(r.errors->max_abs) : Json(nullptr);
  j["rel_err"] = r.errors ? finite_or_null(r.errors->rel) : Json(nullptr);
  if (r.errors && !std::isfinite(r.errors->max_abs)) j["check_failed"] = true;
  std::printf("%s\n", j.dump().c_str());
}

void report(const Result& r, const Config& c, const bench::FmaPeak& peak) {
  if (c.json)
    print_json(r, c, peak);
  else
    print_row(r, c, peak);
  std::fflush(stdout);
}

// ---- main --------------------------------------------------------------------------------------

// A data-less (batch, rows, heads, head_dim) view: enough for the library's shape rules.
Tensor shape_view(const Config& c, int64_t rows, int heads) {
  alignas(64) static char dummy[64];
  return Tensor::contiguous(dummy, c.dtype, {c.batch, rows, heads, c.head_dim}, c.device);
}

// Checks the problem (shapes and options) with the library's own rules before any memory is
// allocated, so a bad request fails at once with the library's message.
void validate_problem(const Config& c) {
  core::check_inputs(shape_view(c, c.seqlen_q, c.heads), shape_view(c, c.seqlen_k, c.kv_heads),
                     shape_view(c, c.seqlen_k, c.kv_heads), options_of(c), nullptr);
}

// Standard attention refuses problems whose S/P would take more than half the machine.
std::optional<std::string> standard_too_big(const Config& c, bool backward) {
  const int64_t need = standard::workspace_bytes(shape_view(c, c.seqlen_q, c.heads), shape_view(c, c.seqlen_k, c.kv_heads),
                                                 shape_view(c, c.seqlen_k, c.kv_heads), backward);
  const int64_t half = physical_memory_bytes() / 2;
  if (need <= half) return std::nullopt;
  char text[200];
  std::snprintf(text, sizeof text,
                "standard attention would need %.1f GB > half of the machine's memory (%.1f GB); skipped",
                need * 1e-9, half * 1e-9);
  return std::string(text);
}

struct Pass {
  const Impl* impl;
  bool backward;
  std::optional<std::string> skip;  // why it cannot start
};

// Every (impl, pass) the command line asks for, in the order they run: flash first, so its
// peak-memory reading is not hidden under standard attention's larger peak.
std::vector<Pass> plan(const Config& c, const Impl& flash, const Impl& standard) {
  std::vector<Pass> passes;
  for (const Impl* impl : {&flash, &standard}) {
    if (!c.runs(impl->name)) continue;
    for (bool backward : {false, true}) {
      if (backward && !c.backward) continue;
      const bool is_standard = impl == &standard;
      std::optional<std::string> skip;
      if (is_standard && !on_cpu(c))
        skip = "standard attention runs on the CPU only (GPU peers: bench/gpu/bench_sdpa.py)";
      else if (is_standard)
        skip = standard_too_big(c, backward);
      passes.push_back(Pass{impl, backward, skip});
    }
  }
  return passes;
}

void report_skipped(const Pass& pass, const std::string& why, const Config& c, const bench::FmaPeak& peak) {
  report(Result::skipped(pass.impl->name, pass.backward ? "bwd" : "fwd", why), c, peak);
}

void run_all(const Config& c) {
  validate_problem(c);
  const Impl flash = flash_impl(), standard = standard_impl();
  const std::vector<Pass> passes = plan(c, flash, standard);
  const bool any_runs = std::any_of(passes.begin(), passes.end(), [](const Pass& p) { return !p.skip; });

  const bench::FmaPeak peak = on_cpu(c) ? bench::measure_fma_peak(c.threads_used) : bench::FmaPeak{};
  std::optional<Problem> problem;
  std::optional<Oracle> oracle;
  if (any_runs) {
    problem.emplace(c);
    fill_inputs(problem->host, c.backward, c.threads_used);
    problem->inputs_to_device(c.backward);
    if (c.check) oracle.emplace(c, problem->host);
  }
  if (!c.json) print_header(c, peak, oracle ? oracle->slice() : Slice{});
#if FLASHATTN_BENCH_CUDA
  if (!c.json && problem && !on_cpu(c)) {  // which CUDA kernel the forward runs (sm90 or sm80)
    const Tensors& t = problem->run();
    std::printf("cuda forward kernel: %s\n\n",
                cuda::forward_kernel(core::check_forward(t.q.tensor, t.k.tensor, t.v.tensor, t.out.tensor,
                                                         t.lse.tensor, options_of(c), nullptr))
                    .c_str());
  }
#endif

  for (const Pass& pass : passes) {
    if (pass.skip) {
      report_skipped(pass, *pass.skip, c, peak);
      continue;
    }
    const Impl& other = pass.impl == &flash ? standard : flash;
    if (pass.backward && !prepare_backward_inputs(*pass.impl, other, c, *problem)) {
      report_skipped(pass, "no forward implementation could provide out and lse", c, peak);
      continue;
    }
    report(run_pass(*pass.impl, pass.backward, c, *problem, oracle ? &*oracle : nullptr), c, peak);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  CLI::App app{"flashattn-bench: FlashAttention vs standard attention, timed and checked"};
  add_options(app, config);
  CLI11_PARSE(app, argc, argv);
  if (auto exit_code = resolve(config)) return *exit_code;
  try {
    run_all(config);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  } catch (const Unsupported& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "flashattn-bench: out of memory allocating the inputs of this problem\n");
    return 1;
  }
  return 0;
}
