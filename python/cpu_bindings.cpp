// pybind11 binding of the CPU kernels. It takes raw addresses and sizes only (no libtorch),
// so one build serves every torch version; robustmerge_kernels/backends/cpu.py validates
// tensors, builds the tables and owns all memory.
#include <pybind11/pybind11.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "robustmerge/robustmerge_cpu.h"
#include "table_schema.h"
#include "tensor_exchange.h"

namespace py = pybind11;
namespace rm = robustmerge;

static bool robustmerge_tables(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                               int64_t n_modules, double lam, int n_threads, uintptr_t status,
                               uintptr_t module_status, uintptr_t tau_out, uintptr_t scales_out) {
  rm::MergeTables t = rm::plan_tables(items, n_items, b_scale, modules, n_modules, lam);
  t.n_threads = n_threads;
  t.status = reinterpret_cast<int32_t*>(status);
  t.module_status = reinterpret_cast<int32_t*>(module_status);
  t.tau_out = reinterpret_cast<uint32_t*>(tau_out);
  t.scales_out = reinterpret_cast<double*>(scales_out);
  rm::validate(t);  // throws ValueError before the GIL is released
  py::gil_scoped_release release;
  return rm::robustmerge_cpu(t);
}


// Exact magnitude thresholds for a batch of matrices (baseline methods' top-k masks): one row
// per matrix in an int64 table [n, 4] = (address, dtype, numel, k). keys_out[i] receives the
// k-th smallest |x| (1-based) as a magnitude key, exactly robustmerge's select_threshold;
// k < 1 gives 0 (keep everything). Returns False when a matrix holds inf/NaN (status[i] = 1).
static bool thresholds_table(uintptr_t table, int64_t n, int n_threads, uintptr_t keys_out, uintptr_t status_out) {
  const int64_t* t = reinterpret_cast<const int64_t*>(table);
  if (n < 0 || (n > 0 && (!t || !keys_out || !status_out)) || n_threads < 1)
    throw std::invalid_argument("thresholds: bad arguments");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = t + 4 * i;
    if (!row[0] || row[2] < 1 || row[3] < 0 || row[3] > row[2]) throw std::invalid_argument("thresholds: bad row");
    if (row[1] != rm::kF32 && row[1] != rm::kF16 && row[1] != rm::kBF16)
      throw std::invalid_argument("thresholds: dtype must be f32, f16 or bf16");
  }
  uint32_t* keys = reinterpret_cast<uint32_t*>(keys_out);
  int32_t* status = reinterpret_cast<int32_t*>(status_out);
  std::atomic<bool> ok{true};
  const rm::Kernels& kern = rm::active_kernels();
  {
    py::gil_scoped_release release;
    rm::parallel_for(n, n_threads, [&](int64_t i) {
      const int64_t* row = t + 4 * i;
      thread_local std::vector<uint32_t> candidates, sample;
      const rm::Threshold th = rm::select_threshold(kern, int32_t(row[1]), reinterpret_cast<const void*>(row[0]),
                                                    row[2], row[3], candidates, sample);
      keys[i] = th.key;
      status[i] = th.finite ? 0 : 1;
      if (!th.finite) ok = false;
    });
  }
  return ok;
}

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "robustmerge_kernels CPU kernels (C++17, pybind11, no libtorch)";
  m.def("robustmerge", &robustmerge_tables, py::arg("items"), py::arg("n_items"), py::arg("b_scale"),
        py::arg("modules"), py::arg("n_modules"), py::arg("lam"), py::arg("n_threads"), py::arg("status"),
        py::arg("module_status") = 0, py::arg("tau_out") = 0, py::arg("scales_out") = 0,
        "RobustMerge a whole plan. Returns False (statuses set) when an input holds inf/NaN.");
  m.def("thresholds", &thresholds_table, py::arg("table"), py::arg("n"), py::arg("n_threads"), py::arg("keys_out"),
        py::arg("status_out"), "Exact k-th smallest |x| keys for a table of (address, dtype, numel, k) rows.");
  // SIMD code path (csrc/robustmerge/dispatch.h): chosen for this CPU at import.
  m.def("simd_path", [] { return std::string(rm::active_kernels().name); },
        "The SIMD code path the kernels use: avx512, avx2 or portable.");
  m.def("set_simd_path", &rm::set_path, py::arg("name"),
        "Use this SIMD path ('auto': the best this CPU supports). ValueError if unknown or unsupported here.");
  m.def("simd_paths", [] {
    py::dict out;  // every path compiled in, best first -> whether this CPU can run it
    for (const rm::SimdPath& p : rm::simd_paths()) out[p.kernels->name] = p.supported;
    return out;
  }, "Every SIMD path in this build, best first, mapped to whether this CPU supports it.");
  robustmerge_bindings::add_table_schema(m);
  robustmerge_bindings::add_tensor_exchange(m);  // item tables filled from tensor objects (all backends)
}
