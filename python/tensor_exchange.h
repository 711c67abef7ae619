// Filling the plan tables from the tensors themselves at C speed, through the DLPack C exchange
// API (DLPack >= 1.3; torch >= 2.10 publishes it as torch.Tensor.__dlpack_c_exchange_api__).
//
// Why: tabling a llava-7b T = 8 group from Python reads five attributes of each of 3,584
// tensors (shape, dtype, device, contiguity, address), ~4 ms of host time per merge. The
// exchange API's dltensor_from_py_object_no_sync fills a DLTensor (address, device, dtype,
// shape, strides) for a tensor object with one C call, no allocation and no reference count,
// and it is a published ABI, so this stays free of libtorch: one build serves any torch that
// has the API (robustmerge_kernels/backends/tables.py falls back to Python where it does not).
//
// The structs below are declared from the DLPack specification's ABI (dlpack.h, v1.x); only
// the fields read here are typed. Anything this fast path does not take (another tensor type,
// device, dtype, shape, a non-contiguous layout, a conversion error) makes it return the
// position of that tensor, and the Python layer redoes the group on its checked path, which
// copies or names the error.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "robustmerge/dtype.h"
#include "robustmerge/plan_tables.h"

namespace robustmerge_bindings {
namespace dlpack {

struct Version {
  uint32_t major, minor;
};
struct Device {
  int32_t device_type, device_id;  // kDLCPU = 1, kDLCUDA = 2
};
struct DataType {
  uint8_t code, bits;  // code: kDLFloat = 2, kDLBfloat = 4
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct ExchangeHeader {
  Version version;
  ExchangeHeader* prev_api;
};
struct ExchangeAPI {
  ExchangeHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // may be null
  void* current_work_stream;
};

constexpr const char* kCapsuleName = "dlpack_exchange_api";
constexpr uint8_t kFloat = 2, kBfloat = 4;

// The API table behind `capsule`, or an exception saying why it cannot be used.
inline const ExchangeAPI* exchange_api(pybind11::handle capsule) {
  void* p = PyCapsule_GetPointer(capsule.ptr(), kCapsuleName);
  if (!p) throw pybind11::error_already_set();
  const ExchangeAPI* api = static_cast<const ExchangeAPI*>(p);
  if (api->header.version.major != 1)
    throw std::invalid_argument("DLPack exchange API of major version " + std::to_string(api->header.version.major) +
                                ", this build reads version 1");
  if (!api->dltensor_from_py_object_no_sync)
    throw std::invalid_argument("the DLPack exchange API has no dltensor_from_py_object_no_sync");
  return api;
}

// Kernel dtype code of a DLPack dtype (float64 only where `f64_ok`: an output type), or -1.
inline int32_t kernel_dtype(DataType t, bool f64_ok = false) {
  if (t.lanes != 1) return -1;
  if (f64_ok && t.code == kFloat && t.bits == 64) return robustmerge::kF64;
  if (t.code == kFloat && t.bits == 32) return robustmerge::kF32;
  if (t.code == kFloat && t.bits == 16) return robustmerge::kF16;
  if (t.code == kBfloat && t.bits == 16) return robustmerge::kBF16;
  return -1;
}

// torch's is_contiguous for a rows x cols tensor: strides of size-1 dimensions do not count.
inline bool contiguous_2d(const Tensor& t) {
  if (!t.strides) return true;
  const int64_t rows = t.shape[0], cols = t.shape[1];
  if (rows == 0 || cols == 0) return true;
  return (cols == 1 || t.strides[1] == 1) && (rows == 1 || t.strides[0] == cols);
}

// `obj` read into `t` when it is of one of `types` exactly (a subclass may keep its data
// elsewhere than a plain tensor does) and the exchange API can read it; false otherwise,
// with no Python error left set: the caller's Python fallback reports what is wrong.
inline bool read_exact(const ExchangeAPI* api, PyObject* types, PyObject* obj, Tensor* t) {
  bool type_ok = false;
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(types); i < n && !type_ok; ++i)
    type_ok = reinterpret_cast<PyObject*>(Py_TYPE(obj)) == PyTuple_GET_ITEM(types, i);
  if (!type_ok) return false;
  if (api->dltensor_from_py_object_no_sync(obj, t) != 0) {
    PyErr_Clear();
    return false;
  }
  return true;
}

}  // namespace dlpack

// A Python int attribute of `obj` (a new reference is taken and released here).
inline int64_t int_attr(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (!v) throw pybind11::error_already_set();
  const long long x = PyLong_AsLongLong(v);
  Py_DECREF(v);
  if (x == -1 && PyErr_Occurred()) throw pybind11::error_already_set();
  return int64_t(x);
}

// An attribute that must be a list or tuple, as a new reference.
inline PyObject* sequence_attr(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (!v) throw pybind11::error_already_set();
  if (!PyList_Check(v) && !PyTuple_Check(v)) {
    Py_DECREF(v);
    throw std::invalid_argument("fill_tables: expected a list or tuple attribute");
  }
  return v;
}

// RAII for the new references above.
struct Ref {
  PyObject* p;
  ~Ref() { Py_XDECREF(p); }
};

// Fill all tables of one group of modules (robustmerge_kernels/backends/tables.py,
// _exchange_tables) from its ModuleInputs objects: the module table (int64 [n_modules,
// kModCols]), the item table (int64 [n_items, kItemCols]) and b_scale (float64 [n_items]).
// Per module it reads plan.rank / in_features / out_features / members / b_scale /
// out_dtype (code from `out_codes`, a dict torch.dtype -> code) and the A / B tensors of
// g.a / g.b; out_a[m] / out_b[m] are its allocated outputs. k and the clamp index use the
// exact float64 arithmetic of reference.prune_count and tables._module_rows (tests compare).
// Every tensor must be of one of `types` exactly (a subclass may keep its data elsewhere), on
// (device_type, device_id), contiguous, of a kernel dtype (outputs: the module's out_dtype),
// shaped (rank, in_features) for A and (out_features, rank) for B, and every module's
// lists as long as its members. Returns -1 when all are, else the flat position of the first
// tensor that is not (A inputs first, then B inputs, then outputs; a module whose lists do
// not match its plan gives its first A's position); the tables are then incomplete and must
// not be used.
inline int64_t fill_tables(pybind11::list group, pybind11::list out_a, pybind11::list out_b, uintptr_t modules,
                           int64_t n_modules, uintptr_t items, int64_t n_items, uintptr_t b_scale, double density,
                           double clamp_quantile, pybind11::dict out_codes, int32_t device_type, int32_t device_id,
                           pybind11::handle api_capsule, pybind11::tuple types) {
  namespace rm = robustmerge;
  const dlpack::ExchangeAPI* api = dlpack::exchange_api(api_capsule);
  int64_t* mod = reinterpret_cast<int64_t*>(modules);
  int64_t* out = reinterpret_cast<int64_t*>(items);
  double* scale_out = reinterpret_cast<double*>(b_scale);
  if (n_modules < 0 || n_items < 0 || (n_modules > 0 && !mod) || (n_items > 0 && (!out || !scale_out)))
    throw std::invalid_argument("fill_tables: bad table arguments");
  for (pybind11::list l : {group, out_a, out_b})
    if (PyList_GET_SIZE(l.ptr()) != n_modules) throw std::invalid_argument("fill_tables: one entry per module expected");
  static PyObject* const s_plan = PyUnicode_InternFromString("plan");
  static PyObject* const s_a = PyUnicode_InternFromString("a");
  static PyObject* const s_b = PyUnicode_InternFromString("b");
  static PyObject* const s_rank = PyUnicode_InternFromString("rank");
  static PyObject* const s_in = PyUnicode_InternFromString("in_features");
  static PyObject* const s_out = PyUnicode_InternFromString("out_features");
  static PyObject* const s_members = PyUnicode_InternFromString("members");
  static PyObject* const s_scale = PyUnicode_InternFromString("b_scale");
  static PyObject* const s_dtype = PyUnicode_InternFromString("out_dtype");

  // One tensor's address and dtype code, or false when the fast path cannot take it.
  auto take = [&](PyObject* obj, int64_t rows, int64_t cols, int32_t want_code, int64_t* address, int64_t* dtype) {
    dlpack::Tensor t;
    if (!dlpack::read_exact(api, types.ptr(), obj, &t)) return false;  // the checked path reports why
    const int32_t code = dlpack::kernel_dtype(t.dtype, want_code >= 0);
    if (t.device.device_type != device_type || t.device.device_id != device_id || code < 0 || t.ndim != 2 ||
        t.shape[0] != rows || t.shape[1] != cols || !dlpack::contiguous_2d(t) || !t.data)
      return false;
    if (want_code >= 0 && code != want_code) return false;  // outputs: of the module's out_dtype
    *address = int64_t(reinterpret_cast<uintptr_t>(t.data) + uintptr_t(t.byte_offset));
    if (dtype) *dtype = code;
    return true;
  };

  int64_t row = 0, a_pos = 0, b_pos = n_items, out_pos = 2 * n_items;
  for (int64_t m = 0; m < n_modules; ++m, out_pos += 2) {
    PyObject* g = PyList_GET_ITEM(group.ptr(), m);
    Ref plan{PyObject_GetAttr(g, s_plan)};
    if (!plan.p) throw pybind11::error_already_set();
    const int64_t rank = int_attr(plan.p, s_rank), in = int_attr(plan.p, s_in), out_f = int_attr(plan.p, s_out);
    Ref members{sequence_attr(plan.p, s_members)}, scales{sequence_attr(plan.p, s_scale)};
    Ref a{sequence_attr(g, s_a)}, b{sequence_attr(g, s_b)}, dtype{PyObject_GetAttr(plan.p, s_dtype)};
    if (!dtype.p) throw pybind11::error_already_set();
    PyObject* code_obj = PyDict_GetItemWithError(out_codes.ptr(), dtype.p);  // borrowed
    if (!code_obj) {
      if (PyErr_Occurred()) throw pybind11::error_already_set();
      throw std::invalid_argument("fill_tables: module " + std::to_string(m) + " has an out_dtype without a code");
    }
    const int32_t out_code = int32_t(PyLong_AsLong(code_obj));
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(members.p);
    if (rank < 1 || in < 1 || out_f < 1 || PySequence_Fast_GET_SIZE(scales.p) != n ||
        PySequence_Fast_GET_SIZE(a.p) != n || PySequence_Fast_GET_SIZE(b.p) != n || row + n > n_items)
      return a_pos;  // the checked path names what does not match

    int64_t* md = mod + m * rm::kModCols;
    md[rm::kModRank] = rank;
    md[rm::kModIn] = in;
    md[rm::kModOut] = out_f;
    md[rm::kModFirst] = row;
    md[rm::kModMembers] = n;
    md[rm::kModOutDtype] = out_code;
    // min(int(rank * clamp_quantile), rank - 1) and int(numel * (1.0 - density)), as in Python.
    md[rm::kModClampIndex] = std::min(int64_t(double(rank) * clamp_quantile), rank - 1);
    const int64_t k_a = int64_t(double(rank * in) * (1.0 - density));
    const int64_t k_b = int64_t(double(out_f * rank) * (1.0 - density));
    for (Py_ssize_t j = 0; j < n; ++j, ++row, ++a_pos, ++b_pos) {
      int64_t* r = out + row * rm::kItemCols;
      if (!take(PySequence_Fast_GET_ITEM(a.p, j), rank, in, -1, &r[rm::kItemA], &r[rm::kItemADtype])) return a_pos;
      if (!take(PySequence_Fast_GET_ITEM(b.p, j), out_f, rank, -1, &r[rm::kItemB], &r[rm::kItemBDtype])) return b_pos;
      r[rm::kItemKA] = k_a;
      r[rm::kItemKB] = k_b;
      const double sc = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(scales.p, j));
      if (sc == -1.0 && PyErr_Occurred()) throw pybind11::error_already_set();
      scale_out[row] = sc;
    }
    if (!take(PyList_GET_ITEM(out_a.ptr(), m), rank, in, out_code, &md[rm::kModOutA], nullptr)) return out_pos;
    if (!take(PyList_GET_ITEM(out_b.ptr(), m), out_f, rank, out_code, &md[rm::kModOutB], nullptr)) return out_pos + 1;
  }
  if (row != n_items) throw std::invalid_argument("fill_tables: the modules hold fewer items than n_items");
  return -1;
}

// The headers of a state dict's values in one pass: (dtypes, shapes, devices) with dtypes
// mapped through `dtypes_by_code` (a dict from code * 256 + bits, lanes 1, to the torch
// dtype), shapes as tuples of ints and devices as the distinct (device_type, device_id)
// pairs; or None when any value is not of one of `types` exactly, cannot be read through the
// exchange API (sparse, quantized, meta tensors raise there) or has a dtype not in the
// dict, so that the Python layer makes its per-tensor checks (adapter_io/sources.py).
inline pybind11::object read_headers(pybind11::list values, pybind11::handle api_capsule, pybind11::tuple types,
                                     pybind11::dict dtypes_by_code) {
  namespace py = pybind11;
  const dlpack::ExchangeAPI* api = dlpack::exchange_api(api_capsule);
  const Py_ssize_t n = PyList_GET_SIZE(values.ptr());
  py::list dtypes(n), shapes(n), devices;
  int64_t seen[8][2];  // distinct devices so far (a state dict spans one or two)
  int n_seen = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    dlpack::Tensor t;
    if (!dlpack::read_exact(api, types.ptr(), PyList_GET_ITEM(values.ptr(), i), &t)) return py::none();
    if (t.dtype.lanes != 1 || t.ndim < 0) return py::none();
    PyObject* dtype = PyDict_GetItemWithError(dtypes_by_code.ptr(), py::int_(int(t.dtype.code) * 256 + t.dtype.bits).ptr());
    if (!dtype) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return py::none();
    }
    PyObject* shape = PyTuple_New(t.ndim);
    if (!shape) throw py::error_already_set();
    for (int32_t d = 0; d < t.ndim; ++d) {
      PyObject* size = PyLong_FromLongLong(t.shape[d]);
      if (!size) {
        Py_DECREF(shape);
        throw py::error_already_set();
      }
      PyTuple_SET_ITEM(shape, d, size);
    }
    Py_INCREF(dtype);
    PyList_SET_ITEM(dtypes.ptr(), i, dtype);
    PyList_SET_ITEM(shapes.ptr(), i, shape);
    int k = 0;
    while (k < n_seen && (seen[k][0] != t.device.device_type || seen[k][1] != t.device.device_id)) ++k;
    if (k == n_seen) {
      if (n_seen == 8) return py::none();  // more devices than a merge accepts anyway: let Python say so
      seen[n_seen][0] = t.device.device_type;
      seen[n_seen][1] = t.device.device_id;
      ++n_seen;
      devices.append(py::make_tuple(t.device.device_type, t.device.device_id));
    }
  }
  return py::make_tuple(dtypes, shapes, devices);
}

inline void add_tensor_exchange(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("fill_tables", &fill_tables, py::arg("group"), py::arg("out_a"), py::arg("out_b"), py::arg("modules"),
        py::arg("n_modules"), py::arg("items"), py::arg("n_items"), py::arg("b_scale"), py::arg("density"),
        py::arg("clamp_quantile"), py::arg("out_codes"), py::arg("device_type"), py::arg("device_id"),
        py::arg("api"), py::arg("types"),
        "Fill a group's module, item and b_scale tables from its ModuleInputs through the DLPack C exchange "
        "API; -1, or the flat position (A inputs, B inputs, outputs) of the first tensor the fast path does "
        "not take.");
  m.def("read_headers", &read_headers, py::arg("values"), py::arg("api"), py::arg("types"),
        py::arg("dtypes_by_code"),
        "(dtypes, shapes, devices) of a list of tensors through the DLPack C exchange API, or None when the "
        "fast path does not take one of them.");
  m.def("check_exchange_api", [](py::handle capsule) {
    const dlpack::ExchangeAPI* api = dlpack::exchange_api(capsule);
    return py::make_tuple(api->header.version.major, api->header.version.minor);
  }, py::arg("api"), "(major, minor) of a usable DLPack exchange API capsule; raises if it cannot be used.");
}

}  // namespace robustmerge_bindings
