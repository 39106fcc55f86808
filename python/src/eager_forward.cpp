// flashattn._C.forward_eager: the forward as the eager torch path calls it on every decode step, with
// as little host time between Python and flashattn::forward as we can: a plain CPython
// METH_FASTCALL function (nanobind's simple call path refuses None, its keyword path parses names
// and defaults: ~0.5 us more), and arrays read in place without nb::ndarray.
#include "eager_forward.h"

#include <climits>
#include <cstdint>
#include <cstring>
#include <string>

#include "dlpack_view.h"
#include "flashattn/flashattn.h"

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

// ---- forward_eager ---------------------------------------------------------------------------------
// Arrays are torch tensors (or any type with DLPack's C exchange API) or DLPack capsules, read in
// place by eager_view; flashattn::forward validates every view as for _C.forward.
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

void add_eager_forward(nb::module_& m) {
  static PyMethodDef lean[] = {
      {"forward_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward_eager)),
       METH_FASTCALL, kForwardEagerDoc},
      {nullptr, nullptr, 0, nullptr}};
  if (PyModule_AddFunctions(m.ptr(), lean) != 0) throw nb::python_error();

  m.def("has_exchange_api", &has_exchange_api, "tensor_type"_a,
        "Whether forward_eager takes this type's objects directly (DLPack's C exchange API, dlpack.h >= 1.3)");
}

}  // namespace flashattn_python
