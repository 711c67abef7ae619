// pybind11 binding of the CUDA kernels (robustmerge_kernels._cuda). Like the CPU binding it
// takes raw addresses only (no libtorch), so one build serves every torch version; the CUDA
// runtime is linked statically, so the module imports on machines without a GPU driver.
//
// Table pointers (items, b_scale, modules) are HOST addresses of the same int64 / float64
// tables as the CPU kernel's; they are validated on the host (ValueError before any CUDA
// call) and uploaded by the binding on the given stream. The addresses inside the tables
// (inputs, outputs) and status / module_status / tau_out / scales_out are DEVICE addresses.
// The call is asynchronous on `stream`: results are ready when the stream's work is.
// `split_elems`: matrices of more keys are selected by several blocks per pass (select.cuh);
// the backend (backends/cuda.py) passes it explicitly, DEFAULT_SPLIT_ELEMS or its override.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "robustmerge/cuda/launch.cuh"
#include "table_schema.h"

#ifndef RMK_CUDA_ARCHS
#define RMK_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
namespace rm = robustmerge;

static void robustmerge_tables(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                               int64_t n_modules, double lam, uintptr_t stream, uintptr_t status,
                               uintptr_t module_status, uintptr_t tau_out, uintptr_t scales_out, int device,
                               uintptr_t workspace, size_t workspace_bytes, bool check_addresses,
                               int64_t split_elems) {
  rm::MergeTables t = rm::plan_tables(items, n_items, b_scale, modules, n_modules, lam);
  t.n_threads = 1;
  t.status = reinterpret_cast<int32_t*>(status);
  if (device < -1) throw std::invalid_argument("robustmerge cuda kernel: device must be >= -1");
  rm::cuda::validate(t);  // host tables only; throws ValueError before the GIL is released
  rm::cuda::check_split_elems(split_elems);
  const rm::cuda::Outputs out{reinterpret_cast<int32_t*>(status), reinterpret_cast<int32_t*>(module_status),
                              reinterpret_cast<uint32_t*>(tau_out), reinterpret_cast<double*>(scales_out)};
  py::gil_scoped_release release;
  rm::cuda::robustmerge_cuda(t, device, reinterpret_cast<cudaStream_t>(stream), out,
                             reinterpret_cast<unsigned char*>(workspace), workspace_bytes, check_addresses,
                             split_elems);
}

// The host plan of these (validated) host tables, as robustmerge() would build it; no CUDA call.
static rm::cuda::HostPlan host_plan(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                                    int64_t n_modules, int64_t split_elems) {
  rm::MergeTables t = rm::plan_tables(items, n_items, b_scale, modules, n_modules, 2.0);
  t.n_threads = 1;
  t.status = reinterpret_cast<int32_t*>(uintptr_t(1));  // not used here; validate() wants it non-null
  rm::cuda::validate(t);
  return rm::cuda::HostPlan(t, split_elems);
}

static size_t workspace_size(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                             int64_t n_modules, int64_t split_elems) {
  return host_plan(items, n_items, b_scale, modules, n_modules, split_elems).total;
}

// The selection's launch plan, for tests and benchmarks: which matrices are split, into how
// many blocks, the grid of each selection launch and the split scratch in the workspace.
static py::dict select_plan(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                            int64_t n_modules, int64_t split_elems) {
  const rm::cuda::HostPlan hp = host_plan(items, n_items, b_scale, modules, n_modules, split_elems);
  std::vector<int64_t> blocks;
  for (int64_t s = 0; s < hp.n_split(); ++s) blocks.push_back(hp.split_first[s + 1] - hp.split_first[s]);
  py::dict d;
  d["split_matrices"] = hp.split_mat;  // 2 * item + (1 for B)
  d["split_blocks"] = blocks;
  d["grids"] = hp.select_grids();
  d["split_scratch_bytes"] = hp.total - hp.o_split_hist;  // histograms, counters, states (+ alignment)
  d["workspace_bytes"] = hp.total;
  return d;
}

static int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error (no driver / no device)
    return 0;
  }
  return n;
}

static std::string device_error() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  cudaGetLastError();
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return n > 0 ? std::string() : std::string("no CUDA device");
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "robustmerge_kernels CUDA kernels (CUDA C++, pybind11, no libtorch, static CUDA runtime)";
  m.def("robustmerge", &robustmerge_tables, py::arg("items"), py::arg("n_items"), py::arg("b_scale"),
        py::arg("modules"), py::arg("n_modules"), py::arg("lam"), py::arg("stream"), py::arg("status"),
        py::arg("module_status") = 0, py::arg("tau_out") = 0, py::arg("scales_out") = 0, py::arg("device") = -1,
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0, py::arg("check_addresses") = true,
        py::arg("split_elems") = rm::cuda::kDefaultSplitElems,
        "RobustMerge a whole plan on the GPU, asynchronously on `stream` (a cudaStream_t as an int; 0 is the "
        "legacy default stream). Host tables, device inputs and outputs; `device` -1 keeps the current device. "
        "Input inf/NaN sets `status` (Status bits per item); output overflow sets `module_status`. `workspace`: "
        "device memory of workspace_bytes >= workspace_size(...) (e.g. from torch's allocator), 0 to allocate "
        "one stream-ordered here. `check_addresses`: ask the driver that every address is device memory of "
        "`device` (ValueError otherwise); False for callers that checked their tensors' devices. "
        "`split_elems`: matrices of more keys are selected by several blocks per pass (>= 0; 0 splits all).");
  m.def("workspace_size", &workspace_size, py::arg("items"), py::arg("n_items"), py::arg("b_scale"),
        py::arg("modules"), py::arg("n_modules"), py::arg("split_elems") = rm::cuda::kDefaultSplitElems,
        "Device workspace bytes robustmerge() needs for these host tables and split_elems (validates them; "
        "no CUDA call)");
  m.def("select_plan", &select_plan, py::arg("items"), py::arg("n_items"), py::arg("b_scale"), py::arg("modules"),
        py::arg("n_modules"), py::arg("split_elems") = rm::cuda::kDefaultSplitElems,
        "The selection launches robustmerge() would make for these host tables (no CUDA call): dict of "
        "split_matrices (2 * item + 1 for B), split_blocks, grids, split_scratch_bytes, workspace_bytes");
  m.def("device_count", &device_count, "CUDA devices this module's runtime sees (0 without a driver or GPU)");
  m.def("device_error", &device_error, "Why no device is usable ('' when one is)");
  m.def("runtime_version", [] { return CUDART_VERSION; }, "CUDA runtime version the module was built with");
  m.attr("ARCHITECTURES") = RMK_CUDA_ARCHS;
  m.attr("DEFAULT_SPLIT_ELEMS") = rm::cuda::kDefaultSplitElems;
  m.attr("SPLIT_SLICE") = rm::cuda::kSplitSlice;
  robustmerge_bindings::add_table_schema(m);
}
