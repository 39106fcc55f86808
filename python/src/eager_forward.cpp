// flashattn._C.forward_eager: the forward as the eager torch path calls it on every decode step, with
// as little host time between Python and flashattn::forward as we can: a plain CPython
// METH_FASTCALL function (nanobind's simple call path refuses None, its keyword path parses names
// and defaults: ~0.5 us more), and arrays read in place without nb::ndarray.
#include "eager_forward.h"

#include <climits>
#include <optional>
#include <cstdint>
#include <cstring>
#include <string>

#include "dlpack_view.h"
#include "flashattn/flashattn.h"
#include "options.h"

namespace nb = nanobind;
namespace fa = flashattn;
using namespace nb::literals;

namespace flashattn_python {
namespace {

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
    if (api->dltensor_from_py_object_no_sync(o, &local) != 0) {
      // torch refuses to describe it (a meta tensor, say): name the argument, keep torch's first line.
      nb::python_error e;
      std::string why = e.what();
      why = why.substr(0, why.find('\n'));
      throw fa::Error(name, "a CPU or CUDA tensor with data (DLPack)", why);
    }
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

// stream: an int, or None for q's producer's current stream.
void* stream_argument(PyObject* stream, PyObject* q, const fa::Tensor& tq) {
  if (stream == Py_None) return producer_stream(q, tq);
  void* s = PyLong_AsVoidPtr(stream);
  if (PyErr_Occurred()) throw nb::python_error();
  return s;
}

// ---- forward_eager ---------------------------------------------------------------------------------
// Arrays are torch tensors (or any type with DLPack's C exchange API) or DLPack capsules, read in
// place by eager_view; flashattn::forward validates every view as for _C.forward.
constexpr const char* kForwardEagerDoc =
    "forward_eager($module, q, k, v, out, lse, seqused_k, alibi_slopes, softmax_scale, causal, window_left, "
    "window_right, softcap, deterministic, num_splits, stream, [sinks], /)\n--\n\n"
    "forward() for the eager path, positional arguments only. Arrays: tensors whose type has DLPack's C "
    "exchange API (has_exchange_api) or DLPack capsules; lse, seqused_k, alibi_slopes, softmax_scale and "
    "sinks may be None. stream: an int, or None for q's producer's current stream (exchange API only).";

int integer(PyObject* h, const char* name) {
  long long x = PyLong_AsLongLong(h);
  if (x == -1 && PyErr_Occurred()) throw nb::python_error();
  if (x < INT32_MIN || x > INT32_MAX) throw fa::Error(name, "a 32-bit integer", std::to_string(x));
  return static_cast<int>(x);
}

// The option arguments softmax_scale, causal, window_left, window_right, softcap, deterministic,
// num_splits (a[0..6]) of every eager entry below: their one parser (the nanobind entries of
// binding.cpp get the same values typed by nanobind and fill Options through its `options`).
fa::Options eager_options(PyObject* const* a) {
  return make_options(a[0] == Py_None ? std::nullopt : std::optional<float>(number(a[0])), truth(a[1]),
                      integer(a[2], "window_left"), integer(a[3], "window_right"), number(a[4]), std::nullopt,
                      truth(a[5]), 0, integer(a[6], "num_splits"), nullptr);
}

// The Python exception for the one being handled (call inside a catch block).
void set_python_error() {
  try {
    throw;
  } catch (const fa::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const fa::Unsupported& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what());
  } catch (nb::python_error& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

void run_forward(const fa::Tensor& q, const fa::Tensor& k, const fa::Tensor& v, const fa::Tensor& out,
                 const fa::Tensor& lse, const fa::Options& o) {
  nb::gil_scoped_release release;
  fa::forward(q, k, v, out, lse, o);
}

PyObject* forward_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 15 && nargs != 16) {  // sinks, the 16th, may be left out
      PyErr_Format(PyExc_TypeError, "forward_eager() takes 15 positional arguments, or 16 with sinks (%zd given)",
                   nargs);
      return nullptr;
    }
    fa::Tensor tq = eager_view(args[0], "q"), tk = eager_view(args[1], "k"), tv = eager_view(args[2], "v"),
               to = eager_view(args[3], "out"), tl = eager_view_or_none(args[4], "lse");
    fa::Options o = eager_options(args + 7);
    if (args[5] != Py_None) o.seqused_k = eager_view(args[5], "seqused_k");
    if (args[6] != Py_None) o.alibi_slopes = eager_view(args[6], "alibi_slopes");
    if (nargs == 16 && args[15] != Py_None) o.sinks = eager_view(args[15], "sinks");
    o.stream = stream_argument(args[14], args[0], tq);
    run_forward(tq, tk, tv, to, tl, o);
    Py_RETURN_NONE;
  } catch (...) {
    set_python_error();
  }
  return nullptr;
}

// ---- forward_eager_out: the same, allocating the output -------------------------------------------
// The decode step's usual call, with the layout tests the Python side would make (q contiguous, k/v
// with a dense last dim, v's head dim = q's) done on the DLTensors here, and `out` allocated by the
// given allocator (torch.empty_like: a caching-allocator tensor like any other) called from C.
// NotImplemented when the layout needs the Python path (copies, an explicit output shape).
constexpr const char* kForwardEagerOutDoc =
    "forward_eager_out($module, empty_like, q, k, v, seqused_k, alibi_slopes, softmax_scale, causal, "
    "window_left, window_right, softcap, deterministic, num_splits, [sinks], /)\n--\n\n"
    "-> out = empty_like(q) after forward_eager(q, k, v, out, None, ..., stream=None) (tensors with DLPack's C "
    "exchange API), or NotImplemented when q is not contiguous, k or v has a strided last dim, or v's head "
    "dim differs from q's.";

// torch's is_contiguous: row-major strides, size-1 dims' strides ignored.
bool row_major(const fa::Tensor& t) {
  int64_t expected = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (t.stride[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

bool dense_last(const fa::Tensor& t) { return t.rank >= 1 && (t.shape[t.rank - 1] == 1 || t.stride[t.rank - 1] == 1); }

PyObject* forward_eager_out(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* out = nullptr;
  try {
    if (nargs != 13 && nargs != 14) {  // sinks, the 14th, may be left out
      PyErr_Format(PyExc_TypeError, "forward_eager_out() takes 13 positional arguments, or 14 with sinks (%zd given)",
                   nargs);
      return nullptr;
    }
    fa::Tensor tq = eager_view(args[1], "q"), tk = eager_view(args[2], "k"), tv = eager_view(args[3], "v");
    if (tq.rank < 1 || !row_major(tq) || !dense_last(tk) || !dense_last(tv) ||
        tv.shape[tv.rank - 1] != tq.shape[tq.rank - 1])
      Py_RETURN_NOTIMPLEMENTED;
    fa::Options o = eager_options(args + 6);
    if (args[4] != Py_None) o.seqused_k = eager_view(args[4], "seqused_k");
    if (args[5] != Py_None) o.alibi_slopes = eager_view(args[5], "alibi_slopes");
    if (nargs == 14 && args[13] != Py_None) o.sinks = eager_view(args[13], "sinks");
    o.stream = producer_stream(args[1], tq);
    out = PyObject_Vectorcall(args[0], args + 1, 1, nullptr);  // empty_like(q)
    if (!out) return nullptr;
    run_forward(tq, tk, tv, eager_view(out, "out"), fa::Tensor{}, o);
    return out;
  } catch (...) {
    Py_XDECREF(out);
    set_python_error();
  }
  return nullptr;
}

// ---- forward_kvcache_eager: flash_attn_with_kvcache's torch call --------------------------------
constexpr const char* kForwardKvcacheEagerDoc =
    "forward_kvcache_eager($module, q, k, v, k_cache, v_cache, out, lse, cache_seqlens, cache_batch_idx, "
    "cache_leftpad, page_table, rotary_cos, rotary_sin, rotary_interleaved, alibi_slopes, sinks, softmax_scale, "
    "causal, window_left, window_right, softcap, deterministic, num_splits, stream, /)\n--\n\n"
    "forward_kvcache() for the torch path, positional arguments only (arrays as for forward_eager; every "
    "optional array may be None). The C++ library validates the whole call before it appends k/v into the "
    "cache: a rejected call writes nothing.";

PyObject* forward_kvcache_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 24) {
      PyErr_Format(PyExc_TypeError, "forward_kvcache_eager() takes 24 positional arguments (%zd given)", nargs);
      return nullptr;
    }
    auto optional = [&](int i, const char* name) -> std::optional<fa::Tensor> {
      if (args[i] == Py_None) return std::nullopt;
      return eager_view(args[i], name);
    };
    const fa::Tensor tq = eager_view(args[0], "q");
    const fa::Tensor tk = eager_view_or_none(args[1], "k"), tv = eager_view_or_none(args[2], "v");
    fa::KVCache cache;
    cache.k_cache = eager_view(args[3], "k_cache");
    cache.v_cache = eager_view(args[4], "v_cache");
    const fa::Tensor to = eager_view(args[5], "out"), tl = eager_view_or_none(args[6], "lse");
    cache.cache_seqlens = optional(7, "cache_seqlens");
    cache.cache_batch_idx = optional(8, "cache_batch_idx");
    cache.cache_leftpad = optional(9, "cache_leftpad");
    cache.page_table = optional(10, "page_table");
    cache.rotary_cos = optional(11, "rotary_cos");
    cache.rotary_sin = optional(12, "rotary_sin");
    cache.rotary_interleaved = truth(args[13]);
    fa::Options o = eager_options(args + 16);
    o.alibi_slopes = optional(14, "alibi_slopes");
    o.sinks = optional(15, "sinks");
    o.stream = stream_argument(args[23], args[0], tq);
    nb::gil_scoped_release release;
    fa::forward_kvcache(tq, tk, tv, cache, to, tl, o);
  } catch (...) {
    set_python_error();
    return nullptr;
  }
  Py_RETURN_NONE;
}

}  // namespace

void add_eager_forward(nb::module_& m) {
  static PyMethodDef lean[] = {
      {"forward_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward_eager)),
       METH_FASTCALL, kForwardEagerDoc},
      {"forward_eager_out", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward_eager_out)),
       METH_FASTCALL, kForwardEagerOutDoc},
      {"forward_kvcache_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward_kvcache_eager)),
       METH_FASTCALL, kForwardKvcacheEagerDoc},
      {nullptr, nullptr, 0, nullptr}};
  if (PyModule_AddFunctions(m.ptr(), lean) != 0) throw nb::python_error();

  m.def("has_exchange_api", &has_exchange_api, "tensor_type"_a,
        "Whether forward_eager takes this type's objects directly (DLPack's C exchange API, dlpack.h >= 1.3)");
}

}  // namespace flashattn_python
