// pybind11 binding of the CPU kernels. It takes raw addresses and sizes only (no libtorch),
// so one build serves every torch version; robustmerge_kernels/backends/cpu.py validates
// tensors, builds the tables and owns all memory.
#include <pybind11/pybind11.h>

#include <thread>

#include "robustmerge/robustmerge_cpu.h"

namespace py = pybind11;
namespace rm = robustmerge;

static bool robustmerge_tables(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                               int64_t n_modules, double lam, int n_threads, uintptr_t status,
                               uintptr_t module_status, uintptr_t tau_out, uintptr_t scales_out) {
  rm::MergeTables t;
  t.items = reinterpret_cast<const int64_t*>(items);
  t.n_items = n_items;
  t.b_scale = reinterpret_cast<const double*>(b_scale);
  t.modules = reinterpret_cast<const int64_t*>(modules);
  t.n_modules = n_modules;
  t.lam = lam;
  t.n_threads = n_threads;
  t.status = reinterpret_cast<int32_t*>(status);
  t.module_status = reinterpret_cast<int32_t*>(module_status);
  t.tau_out = reinterpret_cast<uint32_t*>(tau_out);
  t.scales_out = reinterpret_cast<double*>(scales_out);
  rm::validate(t);  // throws ValueError before the GIL is released
  py::gil_scoped_release release;
  return rm::robustmerge_cpu(t);
}

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "robustmerge_kernels CPU kernels (C++17, pybind11, no libtorch)";
  m.def("robustmerge", &robustmerge_tables, py::arg("items"), py::arg("n_items"), py::arg("b_scale"),
        py::arg("modules"), py::arg("n_modules"), py::arg("lam"), py::arg("n_threads"), py::arg("status"),
        py::arg("module_status") = 0, py::arg("tau_out") = 0, py::arg("scales_out") = 0,
        "RobustMerge a whole plan. Returns False (statuses set) when an input holds inf/NaN.");
  m.def("hardware_threads", [] { return std::thread::hardware_concurrency(); });
  m.attr("ITEM_COLUMNS") = py::make_tuple("a", "b", "a_dtype", "b_dtype", "k_a", "k_b");
  m.attr("MODULE_COLUMNS") = py::make_tuple("rank", "in_features", "out_features", "first", "members", "out_a",
                                            "out_b", "out_dtype", "clamp_index");
  m.attr("DTYPES") = py::dict(py::arg("float32") = int(rm::kF32), py::arg("float16") = int(rm::kF16),
                              py::arg("bfloat16") = int(rm::kBF16), py::arg("float64") = int(rm::kF64));
}
