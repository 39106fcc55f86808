// flashattn._C: the C++ entry points over DLPack arrays (numpy, torch, CPU or CUDA), no copies.
// Every array becomes a flashattn::Tensor view; flashattn::Error becomes ValueError (its message
// names the argument) and flashattn::Unsupported becomes NotImplementedError. No torch here: the
// package's Python code allocates outputs and wires autograd.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "flashattn/flashattn.h"

namespace nb = nanobind;
namespace fa = flashattn;
using namespace nb::literals;

namespace {

// nb::ro: read-only numpy arrays are fine inputs; outputs are arrays the package just allocated.
using Array = nb::ndarray<nb::ro>;

std::string dlpack_dtype_name(nb::dlpack::dtype t) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
  }
  return std::string(kind) + std::to_string(t.bits);
}

fa::Tensor view(const Array& a, const char* name) {
  fa::Tensor t;
  nb::dlpack::dtype dt = a.dtype();
  auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes != 1) throw fa::Error(name, "a scalar dtype", dlpack_dtype_name(dt) + " x" + std::to_string(dt.lanes));
  if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) t.dtype = fa::DType::f32;
  else if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) t.dtype = fa::DType::f16;
  else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) t.dtype = fa::DType::bf16;
  else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) t.dtype = fa::DType::i32;
  else throw fa::Error(name, "float32, float16, bfloat16 (or int32 for cu_seqlens, seqused_k)", dlpack_dtype_name(dt));

  int dev = a.device_type();
  if (dev == nb::device::cpu::value) t.device = fa::Device::cpu();
  else if (dev == nb::device::cuda::value || dev == nb::device::cuda_managed::value)
    t.device = fa::Device::cuda(a.device_id());
  else throw fa::Error(name, "a CPU or CUDA array", "DLPack device type " + std::to_string(dev));

  if (a.ndim() > static_cast<size_t>(fa::Tensor::kMaxRank))
    throw fa::Error(name, "a rank between 1 and 6", std::to_string(a.ndim()));
  t.rank = static_cast<int>(a.ndim());
  for (int i = 0; i < t.rank; ++i) {
    t.shape[i] = static_cast<int64_t>(a.shape(i));
    t.stride[i] = a.stride(i);  // DLPack strides are in elements already
  }
  t.data = const_cast<void*>(a.data());
  return t;
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
  fa::Options o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.alibi_slopes = view(alibi_slopes, "alibi_slopes");
  o.deterministic = deterministic;
  o.num_threads = num_threads;
  o.num_splits = num_splits;
  o.stream = reinterpret_cast<void*>(stream);
  return o;
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

// The forward entry points' last argument: int32 (batch), keys used per sequence (Options::seqused_k).
#define FA_SEQUSED_K_ARG nb::arg("seqused_k").none() = nb::none()

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
         uintptr_t stream, std::optional<Array> seqused_k) {
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        nb::gil_scoped_release release;
        fa::forward(tq, tk, tv, to, tl, o);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), FA_OPTION_ARGS, FA_SEQUSED_K_ARG);

  m.def(
      "backward",
      [](Array dout, Array q, Array k, Array v, Array out, Array lse, Array dq, Array dk, Array dv,
         std::optional<float> scale, bool causal, int wl, int wr, float softcap, std::optional<Array> alibi,
         bool det, int threads, int splits, uintptr_t stream) {
        fa::Tensor tdo = view(dout, "dout"), tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"),
                   to = view(out, "out"), tl = view(lse, "lse"), tdq = view(dq, "dq"), tdk = view(dk, "dk"),
                   tdv = view(dv, "dv");
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        nb::gil_scoped_release release;
        fa::backward(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, o);
      },
      "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a, FA_OPTION_ARGS);

  m.def(
      "forward_varlen",
      [](Array q, Array k, Array v, Array out, std::optional<Array> lse, Array cu_q, Array cu_k, int max_q,
         int max_k, std::optional<float> scale, bool causal, int wl, int wr, float softcap,
         std::optional<Array> alibi, bool det, int threads, int splits, uintptr_t stream,
         std::optional<Array> seqused_k) {
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::VarlenLayout lay = layout(cu_q, cu_k, max_q, max_k);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        nb::gil_scoped_release release;
        fa::forward_varlen(tq, tk, tv, to, tl, lay, o);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a,
      "max_seqlen_k"_a, FA_OPTION_ARGS, FA_SEQUSED_K_ARG);

  m.def(
      "backward_varlen",
      [](Array dout, Array q, Array k, Array v, Array out, Array lse, Array dq, Array dk, Array dv, Array cu_q,
         Array cu_k, int max_q, int max_k, std::optional<float> scale, bool causal, int wl, int wr,
         float softcap, std::optional<Array> alibi, bool det, int threads, int splits, uintptr_t stream) {
        fa::Tensor tdo = view(dout, "dout"), tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"),
                   to = view(out, "out"), tl = view(lse, "lse"), tdq = view(dq, "dq"), tdk = view(dk, "dk"),
                   tdv = view(dv, "dv");
        fa::VarlenLayout lay = layout(cu_q, cu_k, max_q, max_k);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        nb::gil_scoped_release release;
        fa::backward_varlen(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, lay, o);
      },
      "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a, "cu_seqlens_q"_a,
      "cu_seqlens_k"_a, "max_seqlen_q"_a, "max_seqlen_k"_a, FA_OPTION_ARGS);

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
         uintptr_t stream, std::optional<Array> seqused_k) {
        if (iters < 1) throw fa::Error("iters", ">= 1", std::to_string(iters));
        fa::Tensor tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), to = view(out, "out"),
                   tl = lse_view(lse);
        fa::Options o = options(scale, causal, wl, wr, softcap, alibi, det, threads, splits, stream);
        o.seqused_k = view(seqused_k, "seqused_k");
        nb::gil_scoped_release release;
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) fa::forward(tq, tk, tv, to, tl, o);
        const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
        return took.count() / iters;
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "iters"_a, FA_OPTION_ARGS, FA_SEQUSED_K_ARG);

  m.def("cuda_available", &fa::cuda_available);
  m.def("version", &fa::version);
}
