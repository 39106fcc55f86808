// flashattn._C: the C++ entry points over DLPack arrays (numpy, torch, CPU or CUDA), no copies.
// Every array becomes a flashattn::Tensor view; flashattn::Error becomes ValueError (its message
// names the argument) and flashattn::Unsupported becomes NotImplementedError. No torch here: the
// package's Python code allocates outputs and wires autograd. The eager torch path's forward,
// forward_eager, lives in eager_forward.cpp.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "dlpack_view.h"
#include "eager_forward.h"
#include "flashattn/flashattn.h"
#include "options.h"

namespace nb = nanobind;
namespace fa = flashattn;
using namespace nb::literals;

namespace {

using flashattn_python::view;

// nb::ro: read-only numpy arrays are fine inputs; outputs are arrays the package just allocated.
using Array = nb::ndarray<nb::ro>;

fa::Tensor view(const Array& a, const char* name) {
  const int64_t ndim = static_cast<int64_t>(a.ndim());
  if (ndim > fa::Tensor::kMaxRank) throw fa::Error(name, "a rank between 1 and 6", std::to_string(ndim));
  int64_t shape[fa::Tensor::kMaxRank], strides[fa::Tensor::kMaxRank];
  for (int64_t i = 0; i < ndim; ++i) {
    shape[i] = static_cast<int64_t>(a.shape(i));
    strides[i] = a.stride(i);
  }
  return view(a.dtype(), a.device_type(), a.device_id(), ndim, shape, strides, const_cast<void*>(a.data()), name);
}

std::optional<fa::Tensor> view(const std::optional<Array>& a, const char* name) {
  if (!a) return std::nullopt;
  return view(*a, name);
}

// The forward's lse: None = not wanted (a default Tensor{}, which flashattn::forward skips).
fa::Tensor lse_view(const std::optional<Array>& a) { return a ? view(*a, "lse") : fa::Tensor{}; }

fa::Options options(std::optional<float> softmax_scale, bool causal, int window_left, int window_right,
                    float softcap, const std::optional<Array>& alibi_slopes, bool deterministic,
                    int num_threads, int num_splits, uintptr_t stream) {
  return flashattn_python::make_options(softmax_scale, causal, window_left, window_right, softcap,
                                        view(alibi_slopes, "alibi_slopes"), deterministic, num_threads, num_splits,
                                        reinterpret_cast<void*>(stream));
}

fa::VarlenLayout layout(const Array& cu_q, const Array& cu_k, int max_q, int max_k) {
  return {view(cu_q, "cu_seqlens_q"), view(cu_k, "cu_seqlens_k"), max_q, max_k};
}

// The option arguments every entry point takes, in this order, after its arrays (positional or by keyword).
#define FA_OPTION_ARGS                                                                             \
  nb::arg("softmax_scale").none() = nb::none(), nb::arg("causal") = false,                         \
      nb::arg("window_left") = -1, nb::arg("window_right") = -1, nb::arg("softcap") = 0.0f,        \
      nb::arg("alibi_slopes").none() = nb::none(), nb::arg("deterministic") = false,               \
      nb::arg("num_threads") = 0, nb::arg("num_splits") = 0, nb::arg("stream") = 0

// The forward entry points' last arguments: int32 (batch), keys used per sequence (Options::seqused_k),
// and the attention sinks, fp32 (heads) (Options::sinks).
#define FA_SEQUSED_K_ARG nb::arg("seqused_k").none() = nb::none(), nb::arg("sinks").none() = nb::none()

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flashattn C++ entry points over DLPack arrays (see flashattn/flashattn.h)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fa::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const fa::Unsupported& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    }
  });

  m.def(
      "forward",
      [](Array q, Array k, Array v, Array out, std::optional<Array> lse, std::optional<float> scale, bool causal,
         int wl, int wr, float softcap, std::optional<Array> alibi, bool det, int threads, int splits,
         uintptr_t stream, std::optional<Array> seqused_k, std::optional<Array> sinks) {
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        fa::forward(tq, tk, tv, to, tl, o);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), FA_OPTION_ARGS, FA_SEQUSED_K_ARG);

  flashattn_python::add_eager_forward(m);  // forward_eager, has_exchange_api: the eager torch path's forward

  m.def(
      "backward",
      [](Array dout, Array q, Array k, Array v, Array out, Array lse, Array dq, Array dk, Array dv,
         std::optional<float> scale, bool causal, int wl, int wr, float softcap, std::optional<Array> alibi,
         bool det, int threads, int splits, uintptr_t stream, std::optional<Array> sinks) {
        fa::Tensor tdo = view(dout, "dout"), tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"),
                   to = view(out, "out"), tl = view(lse, "lse"), tdq = view(dq, "dq"), tdk = view(dk, "dk"),
                   tdv = view(dv, "dv");
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        fa::backward(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, o);
      },
      "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a, FA_OPTION_ARGS,
      "sinks"_a.none() = nb::none());

  m.def(
      "forward_varlen",
      [](Array q, Array k, Array v, Array out, std::optional<Array> lse, Array cu_q, Array cu_k, int max_q,
         int max_k, std::optional<float> scale, bool causal, int wl, int wr, float softcap,
         std::optional<Array> alibi, bool det, int threads, int splits, uintptr_t stream,
         std::optional<Array> seqused_k, std::optional<Array> sinks, std::optional<Array> page_table,
         std::optional<Array> seqused_q) {
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::VarlenLayout lay = layout(cu_q, cu_k, max_q, max_k);
        lay.page_table = view(page_table, "page_table");
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        o.seqused_q = view(seqused_q, "seqused_q");
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        fa::forward_varlen(tq, tk, tv, to, tl, lay, o);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a,
      "max_seqlen_k"_a, FA_OPTION_ARGS, FA_SEQUSED_K_ARG, "page_table"_a.none() = nb::none(),
      "seqused_q"_a.none() = nb::none());

  m.def(
      "backward_varlen",
      [](Array dout, Array q, Array k, Array v, Array out, Array lse, Array dq, Array dk, Array dv, Array cu_q,
         Array cu_k, int max_q, int max_k, std::optional<float> scale, bool causal, int wl, int wr,
         float softcap, std::optional<Array> alibi, bool det, int threads, int splits, uintptr_t stream,
         std::optional<Array> sinks) {
        fa::Tensor tdo = view(dout, "dout"), tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"),
                   to = view(out, "out"), tl = view(lse, "lse"), tdq = view(dq, "dq"), tdk = view(dk, "dk"),
                   tdv = view(dv, "dv");
        fa::VarlenLayout lay = layout(cu_q, cu_k, max_q, max_k);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        fa::backward_varlen(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, lay, o);
      },
      "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a, "cu_seqlens_q"_a,
      "cu_seqlens_k"_a, "max_seqlen_q"_a, "max_seqlen_k"_a, FA_OPTION_ARGS, "sinks"_a.none() = nb::none());

  m.def(
      "forward_kvcache",
      [](Array q, std::optional<Array> k_new, std::optional<Array> v_new, Array k_cache, Array v_cache, Array out,
         std::optional<Array> lse, std::optional<Array> cache_seqlens, std::optional<Array> cache_batch_idx,
         std::optional<Array> cache_leftpad, std::optional<Array> page_table, std::optional<Array> rotary_cos,
         std::optional<Array> rotary_sin, bool rotary_interleaved, std::optional<float> scale, bool causal, int wl,
         int wr, float softcap, std::optional<Array> alibi, bool det, int threads, int splits, uintptr_t stream,
         std::optional<Array> sinks) {
        fa::Tensor tq = view(q, "q"), to = view(out, "out"), tl = lse_view(lse);
        fa::Tensor tk = k_new ? view(*k_new, "k") : fa::Tensor{}, tv = v_new ? view(*v_new, "v") : fa::Tensor{};
        fa::KVCache cache;
        cache.k_cache = view(k_cache, "k_cache");
        cache.v_cache = view(v_cache, "v_cache");
        cache.cache_seqlens = view(cache_seqlens, "cache_seqlens");
        cache.cache_batch_idx = view(cache_batch_idx, "cache_batch_idx");
        cache.cache_leftpad = view(cache_leftpad, "cache_leftpad");
        cache.page_table = view(page_table, "page_table");
        cache.rotary_cos = view(rotary_cos, "rotary_cos");
        cache.rotary_sin = view(rotary_sin, "rotary_sin");
        cache.rotary_interleaved = rotary_interleaved;
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        fa::forward_kvcache(tq, tk, tv, cache, to, tl, o);
      },
      "q"_a, "k"_a.none(), "v"_a.none(), "k_cache"_a, "v_cache"_a, "out"_a, "lse"_a.none(),
      "cache_seqlens"_a.none() = nb::none(), "cache_batch_idx"_a.none() = nb::none(),
      "cache_leftpad"_a.none() = nb::none(), "page_table"_a.none() = nb::none(),
      "rotary_cos"_a.none() = nb::none(), "rotary_sin"_a.none() = nb::none(), "rotary_interleaved"_a = true,
      FA_OPTION_ARGS, "sinks"_a.none() = nb::none());

  m.def(
      "sink_gradient",
      [](Array dout, Array out, Array lse, Array sinks, Array dsinks, std::optional<Array> cu_seqlens_q,
         int max_seqlen_q, int threads, uintptr_t stream) {
        fa::Tensor tdo = view(dout, "dout"), to = view(out, "out"), tl = view(lse, "lse"), ts = view(sinks, "sinks"),
                   tds = view(dsinks, "dsinks");
        fa::VarlenLayout lay;
        if (cu_seqlens_q) {
          lay.cu_seqlens_q = view(*cu_seqlens_q, "cu_seqlens_q");
          lay.max_seqlen_q = max_seqlen_q;
        }
        fa::Options o;
        o.num_threads = threads;
        o.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        fa::sink_gradient(tdo, to, tl, ts, tds, cu_seqlens_q ? &lay : nullptr, o);
      },
      "dout"_a, "out"_a, "lse"_a, "sinks"_a, "dsinks"_a, "cu_seqlens_q"_a.none() = nb::none(),
      "max_seqlen_q"_a = 0, "num_threads"_a = 0, "stream"_a = 0);

  m.def(
      "merge",
      [](Array partial_out, Array partial_lse, Array out, Array lse, int threads, uintptr_t stream) {
        fa::Tensor tpo = view(partial_out, "partial_out"), tpl = view(partial_lse, "partial_lse"),
                   to = view(out, "out"), tl = view(lse, "lse");
        fa::Options o;
        o.num_threads = threads;
        o.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        fa::merge(tpo, tpl, to, tl, o);
      },
      "partial_out"_a, "partial_lse"_a, "out"_a, "lse"_a, nb::kw_only(), "num_threads"_a = 0, "stream"_a = 0);

  // The C++ side of the Python overhead measurement (python/examples/overhead.py): host time of
  // `iters` back-to-back fa::forward calls on views made once, in microseconds per call. CUDA
  // launches are asynchronous, so this is the launch cost as long as the GPU queue does not fill.
  m.def(
      "time_forward",
      [](Array q, Array k, Array v, Array out, std::optional<Array> lse, int iters, std::optional<float> scale,
         bool causal, int wl, int wr, float softcap, std::optional<Array> alibi, bool det, int threads, int splits,
         uintptr_t stream, std::optional<Array> seqused_k, std::optional<Array> sinks) {
        if (iters < 1) throw fa::Error("iters", ">= 1", std::to_string(iters));
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        o.sinks = view(sinks, "sinks");
        nb::gil_scoped_release release;
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) fa::forward(tq, tk, tv, to, tl, o);
        const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
        return took.count() / iters;
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "iters"_a, FA_OPTION_ARGS, FA_SEQUSED_K_ARG);

  m.def("set_check_lengths", &fa::set_check_lengths, "on"_a,
        "Check GPU-resident lengths, indices and page tables with one device-to-host copy per call");
  m.def("check_lengths", &fa::check_lengths);
  m.def("cuda_available", &fa::cuda_available);
  m.def("version", &fa::version);
}
