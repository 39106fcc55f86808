// flashattn._C: the C++ entry points over DLPack arrays (numpy, torch, CPU or CUDA), no copies.
// Every array becomes a flashattn::Tensor view; flashattn::Error becomes ValueError (its message
// names the argument) and flashattn::Unsupported becomes NotImplementedError. No torch here: the
// package's Python code allocates outputs and wires autograd.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <chrono>
#include <cstdint>
#include <cstring>
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
    default: break;  // the float8/float6/float4 codes: "?"
  }
  return std::string(kind) + std::to_string(t.bits);
}

// A flashattn::Tensor over DLPack's description of an array (shared by nanobind's ndarray and the
// capsule fast path below, so both accept and refuse the same arrays with the same messages).
fa::Tensor view(nb::dlpack::dtype dt, int device_type, int device_id, int64_t ndim, const int64_t* shape,
                const int64_t* strides, void* data, const char* name) {
  fa::Tensor t;
  auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes != 1) throw fa::Error(name, "a scalar dtype", dlpack_dtype_name(dt) + " x" + std::to_string(dt.lanes));
  if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) t.dtype = fa::DType::f32;
  else if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) t.dtype = fa::DType::f16;
  else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) t.dtype = fa::DType::bf16;
  else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) t.dtype = fa::DType::i32;
  else throw fa::Error(name, "float32, float16, bfloat16 (or int32 for cu_seqlens, seqused_k)", dlpack_dtype_name(dt));

  if (device_type == nb::device::cpu::value) t.device = fa::Device::cpu();
  else if (device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value)
    t.device = fa::Device::cuda(device_id);
  else throw fa::Error(name, "a CPU or CUDA array", "DLPack device type " + std::to_string(device_type));

  if (ndim < 0 || ndim > fa::Tensor::kMaxRank)
    throw fa::Error(name, "a rank between 1 and 6", std::to_string(ndim));
  t.rank = static_cast<int>(ndim);
  int64_t compact = 1;  // DLPack's strides may be absent: then the array is row-major
  for (int i = t.rank - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = strides ? strides[i] : compact;  // DLPack strides are in elements already
    compact *= shape[i];
  }
  t.data = data;
  return t;
}

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

// ---- the eager fast path: torch tensors without nb::ndarray ---------------------------------------
// nb::ndarray takes ownership of a DLPack capsule (a heap handle, reference counts, its own checks),
// and making the capsule costs ~0.2 us a tensor in Python. Two cheaper ways in, both borrowing:
// - DLPack's C exchange API (dlpack.h >= 1.3; torch >= 2.10 has it): the tensor's type carries a
//   capsule "dlpack_exchange_api" with C functions; dltensor_from_py_object_no_sync fills a DLTensor
//   describing the tensor in place (no allocation, no Python), valid while the caller holds the
//   tensor, i.e. for this call; current_work_stream gives the producer's current CUDA stream.
// - a DLPack capsule (torch._C._to_dlpack) for a torch without that API: its DLTensor is read in
//   place; the Python caller holds the capsule during the call, and the capsule's own destructor
//   frees it later, as for any capsule nobody consumed.
// The structs below are DLPack's ABI (dlpack.h).
struct DLManagedTensor {
  nb::dlpack::dltensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLManagedTensorVersioned {
  uint32_t major, minor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  nb::dlpack::dltensor dl_tensor;
};
struct DLPackExchangeAPI {
  struct {
    uint32_t major, minor;
    void* prev_api;
  } header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_current_stream);
};

// The exchange API of a Python type, or nullptr when it has none we can use (looked up once per
// type: the last type seen is cached, one type in practice).
const DLPackExchangeAPI* exchange_api(PyTypeObject* type) {
  static PyTypeObject* cached_type = nullptr;
  static const DLPackExchangeAPI* cached_api = nullptr;
  if (type == cached_type) return cached_api;
  const DLPackExchangeAPI* api = nullptr;
  PyObject* capsule = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__");
  if (capsule && PyCapsule_IsValid(capsule, "dlpack_exchange_api")) {
    auto* found = static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
    // 1.3 laid out the table above; later minor versions only append to it.
    if (found && found->header.major == 1 && found->header.minor >= 3 && found->dltensor_from_py_object_no_sync &&
        found->current_work_stream)
      api = found;
  }
  Py_XDECREF(capsule);
  PyErr_Clear();  // no attribute: no API
  cached_type = type;
  cached_api = api;
  return api;
}

// Whether flashattn._C.forward_eager can take this type's objects directly (else: capsules).
bool has_exchange_api(nb::handle type) {
  return PyType_Check(type.ptr()) && exchange_api(reinterpret_cast<PyTypeObject*>(type.ptr())) != nullptr;
}

// A view of `o`: an object whose type has the exchange API, or a DLPack capsule.
fa::Tensor eager_view(PyObject* o, const char* name) {
  nb::dlpack::dltensor local;
  const nb::dlpack::dltensor* dl = nullptr;
  if (PyCapsule_CheckExact(o)) {
    const char* tag = PyCapsule_GetName(o);
    if (tag && std::strcmp(tag, "dltensor") == 0)
      dl = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(o, tag))->dl_tensor;
    else if (tag && std::strcmp(tag, "dltensor_versioned") == 0)
      dl = &static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(o, tag))->dl_tensor;
    else
      throw fa::Error(name, "an unused DLPack capsule", std::string("a capsule named '") + (tag ? tag : "") + "'");
  } else if (const DLPackExchangeAPI* api = exchange_api(Py_TYPE(o))) {
    if (api->dltensor_from_py_object_no_sync(o, &local) != 0) throw nb::python_error();
    dl = &local;
  } else {
    throw fa::Error(name, "a torch tensor (DLPack C exchange API) or a DLPack capsule", Py_TYPE(o)->tp_name);
  }
  return view(dl->dtype, dl->device.device_type, dl->device.device_id, dl->ndim, dl->shape, dl->strides,
              static_cast<char*>(dl->data) + dl->byte_offset, name);
}

// The current CUDA stream of the producer of `o` (q) for its device, through the exchange API.
void* producer_stream(PyObject* o, const fa::Tensor& t) {
  if (t.device.kind != fa::DeviceKind::cuda) return nullptr;
  const DLPackExchangeAPI* api = PyCapsule_CheckExact(o) ? nullptr : exchange_api(Py_TYPE(o));
  if (!api) throw fa::Error("stream", "an int (the CUDA stream) when q is a DLPack capsule", "None");
  void* stream = nullptr;
  if (api->current_work_stream(nb::device::cuda::value, t.device.index, &stream) != 0) throw nb::python_error();
  return stream;
}

// None -> a default Tensor{} (not given).
fa::Tensor eager_view_or_none(PyObject* o, const char* name) {
  return o == Py_None ? fa::Tensor{} : eager_view(o, name);
}

// float(h) for a number (a Python float, int, or anything with __float__).
float number(PyObject* h) {
  double x = PyFloat_AsDouble(h);
  if (x == -1.0 && PyErr_Occurred()) throw nb::python_error();
  return static_cast<float>(x);
}

bool truth(PyObject* h) {
  int r = PyObject_IsTrue(h);
  if (r < 0) throw nb::python_error();
  return r != 0;
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

// ---- forward_eager: the eager torch path's forward (flashattn/_torch_ops.py) ----------------------
// A CPython METH_FASTCALL function rather than an m.def: nanobind's simple call path refuses None
// and its keyword path parses defaults and names, ~0.5 us more a call. Arrays are torch tensors (or
// any type with DLPack's C exchange API) or DLPack capsules, read in place by eager_view;
// flashattn::forward validates every view as for forward().
constexpr const char* kForwardEagerDoc =
    "forward_eager($module, q, k, v, out, lse, seqused_k, alibi_slopes, softmax_scale, causal, window_left, "
    "window_right, softcap, deterministic, num_splits, stream, /)\n--\n\n"
    "forward() for the eager path, positional arguments only. Arrays: tensors whose type has DLPack's C "
    "exchange API (has_exchange_api) or DLPack capsules; lse, seqused_k, alibi_slopes and softmax_scale may "
    "be None. stream: an int, or None for q's producer's current stream (exchange API only).";

int integer(PyObject* h, const char* name) {
  long long x = PyLong_AsLongLong(h);
  if (x == -1 && PyErr_Occurred()) throw nb::python_error();
  if (x < INT32_MIN || x > INT32_MAX) throw fa::Error(name, "a 32-bit integer", std::to_string(x));
  return static_cast<int>(x);
}

PyObject* forward_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 15) {
      PyErr_Format(PyExc_TypeError, "forward_eager() takes 15 positional arguments (%zd given)", nargs);
      return nullptr;
    }
    fa::Tensor tq = eager_view(args[0], "q"), tk = eager_view(args[1], "k"), tv = eager_view(args[2], "v"),
               to = eager_view(args[3], "out"), tl = eager_view_or_none(args[4], "lse");
    fa::Options o;
    if (args[5] != Py_None) o.seqused_k = eager_view(args[5], "seqused_k");
    if (args[6] != Py_None) o.alibi_slopes = eager_view(args[6], "alibi_slopes");
    if (args[7] != Py_None) o.softmax_scale = number(args[7]);
    o.causal = truth(args[8]);
    o.window_left = integer(args[9], "window_left");
    o.window_right = integer(args[10], "window_right");
    o.softcap = number(args[11]);
    o.deterministic = truth(args[12]);
    o.num_splits = integer(args[13], "num_splits");
    if (args[14] == Py_None) {
      o.stream = producer_stream(args[0], tq);
    } else {
      o.stream = PyLong_AsVoidPtr(args[14]);
      if (PyErr_Occurred()) throw nb::python_error();
    }
    {
      nb::gil_scoped_release release;
      fa::forward(tq, tk, tv, to, tl, o);
    }
    Py_RETURN_NONE;
  } catch (const fa::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const fa::Unsupported& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what());
  } catch (nb::python_error& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

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

  // The lean forward (see forward_eager above): a plain CPython function.
  static PyMethodDef lean[] = {
      {"forward_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward_eager)),
       METH_FASTCALL, kForwardEagerDoc},
      {nullptr, nullptr, 0, nullptr}};
  if (PyModule_AddFunctions(m.ptr(), lean) != 0) throw nb::python_error();

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

  m.def("has_exchange_api", &has_exchange_api, "tensor_type"_a,
        "Whether forward_eager takes this type's objects directly (DLPack's C exchange API, dlpack.h >= 1.3)");
  m.def("cuda_available", &fa::cuda_available);
  m.def("version", &fa::version);
}
