// Host driver of the CUDA kernels (kernels.cuh): validation of the HOST copies of the plan
// tables, the workspace layout (host_plan.cuh), one upload, the launches (select: 1 + the
// split passes, see select.cuh; fuse_a, weights, fuse_b) and copies of the results, all
// enqueued on the caller's stream. Nothing here synchronises the host with the device
// (except the brief staging copy of the pageable host tables that cudaMemcpyAsync does),
// so the caller reads the status array after the stream's work (torch does so on .cpu()).
//
// Host cost per call is kept to O(items + modules) integer work: validation builds no
// message unless a row fails, the workspace can come from the caller (torch's caching
// allocator: no cudaMallocAsync beside it), and the per-address driver checks
// (cudaPointerGetAttributes, one per table address: ~4,000 for llava-7b T = 8) are
// skipped when the caller has already checked where its tensors live.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../robustmerge_cpu.h"  // MergeTables, robustmerge::validate (the CPU kernel's checks and messages)
#include "host_plan.cuh"
#include "kernels.cuh"

namespace robustmerge {
namespace cuda {

static_assert(kBins == robustmerge::kBins, "the CUDA first pass uses the CPU histogram's bins");

// The conditions of robustmerge::validate (robustmerge_cpu.h), without a std::string per
// row: true when the tables are valid. Keep in step with that function; validate() below
// falls back to it for the message, and tests/test_cuda_backend.py checks every message.
inline bool tables_valid(const MergeTables& t) {
  if (t.n_items < 1 || t.n_modules < 1) return false;
  if (!t.items || !t.modules || !t.b_scale || !t.status) return false;
  int64_t expected_first = 0;
  for (int64_t m = 0; m < t.n_modules; ++m) {
    const int64_t* row = t.modules + m * kModCols;
    if (row[kModRank] < 1 || row[kModIn] < 1 || row[kModOut] < 1) return false;
    if (row[kModFirst] != expected_first || row[kModMembers] < 1) return false;
    expected_first += row[kModMembers];
    if (expected_first > t.n_items) return false;
    if (!row[kModOutA] || !row[kModOutB]) return false;
    const int64_t od = row[kModOutDtype];
    if (od != kF32 && od != kF16 && od != kBF16 && od != kF64) return false;
    if (row[kModClampIndex] < 0 || row[kModClampIndex] >= row[kModRank]) return false;
    for (int64_t i = row[kModFirst]; i < row[kModFirst] + row[kModMembers]; ++i) {
      const int64_t* it = t.items + i * kItemCols;
      if (!it[kItemA] || !it[kItemB]) return false;
      for (int col : {kItemADtype, kItemBDtype})
        if (it[col] != kF32 && it[col] != kF16 && it[col] != kBF16) return false;
      if (it[kItemKA] < 0 || it[kItemKA] > row[kModRank] * row[kModIn]) return false;
      if (it[kItemKB] < 0 || it[kItemKB] > row[kModRank] * row[kModOut]) return false;
    }
  }
  return expected_first == t.n_items;
}

// The CPU kernel's validation reworded for this backend, plus the limit the device code
// relies on (32-bit counts and column indices). ValueError (std::invalid_argument) names
// the first bad row.
inline void validate(const MergeTables& t) {
  if (!tables_valid(t)) {
    const std::string prefix = "robustmerge cpu kernel: ";
    try {
      MergeTables host = t;
      host.n_threads = 1;
      robustmerge::validate(host);
    } catch (const std::invalid_argument& e) {
      std::string what = e.what();
      if (what.compare(0, prefix.size(), prefix) == 0) what = what.substr(prefix.size());
      throw std::invalid_argument("robustmerge cuda kernel: " + what);
    }
    throw std::invalid_argument("robustmerge cuda kernel: invalid plan tables");  // tables_valid is stricter
  }
  for (int64_t m = 0; m < t.n_modules; ++m) {
    const int64_t* row = t.modules + m * kModCols;
    const int64_t r = row[kModRank];
    if (row[kModIn] > INT32_MAX / r || row[kModOut] > INT32_MAX / r)
      throw std::invalid_argument("robustmerge cuda kernel: module " + std::to_string(m) +
                                  ": a matrix has 2^31 or more elements");
  }
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("robustmerge cuda kernel: ") + what + " failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}

// The addresses in the tables and the outputs must be device (or managed) memory of the
// device the kernels run on: a host address would fault inside a kernel and poison the
// context, so it is refused here with ValueError (after validate(), as this needs CUDA).
inline void check_device_address(const void* ptr, int dev, const char* what, int64_t row) {
  cudaPointerAttributes attr;
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  const std::string where = row >= 0 ? " of row " + std::to_string(row) : "";
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky; clear it
    throw std::invalid_argument(std::string("robustmerge cuda kernel: ") + what + where +
                                ": not a CUDA address (" + cudaGetErrorName(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string("robustmerge cuda kernel: ") + what + where +
                                " is not device memory (a CPU tensor?)");
  if (attr.type == cudaMemoryTypeDevice && attr.device != dev)
    throw std::invalid_argument(std::string("robustmerge cuda kernel: ") + what + where + " is on device " +
                                std::to_string(attr.device) + ", the kernels run on device " + std::to_string(dev));
}

struct Outputs {           // device addresses (0: not wanted)
  int32_t* status;         // [n_items], required
  int32_t* module_status;  // [n_modules]
  uint32_t* tau;           // [n_items, 2]
  double* scales;          // items' ranks concatenated
};

// Runs the merge described by the validated host tables `t` (whose item and output
// addresses are device addresses on `device`; -1: the current device) on `stream`.
// `ws` / `ws_bytes`: a device workspace of at least HostPlan(t, split_elems).total bytes
// (its content does not matter), or null to allocate one stream-ordered here.
// `check_addresses`: ask the driver where every table address lives (callers that checked
// their tensors skip it).
// `split_elems`: matrices with more keys are selected by several blocks (select.cuh).
inline void robustmerge_cuda(const MergeTables& t, int device, cudaStream_t stream, const Outputs& out,
                             unsigned char* ws = nullptr, size_t ws_bytes = 0, bool check_addresses = true,
                             int64_t split_elems = kDefaultSplitElems) {
  const HostPlan hp(t, split_elems);
  if (ws && ws_bytes < hp.total)
    throw std::invalid_argument("robustmerge cuda kernel: workspace of " + std::to_string(ws_bytes) +
                                " bytes, the plan needs " + std::to_string(hp.total));
  const std::vector<unsigned char> host = hp.host_image(t);
  const int64_t W = hp.W, M = hp.M;

  if (device >= 0) check(cudaSetDevice(device), "cudaSetDevice");
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (check_addresses) {
    for (int64_t i = 0; i < W; ++i) {
      check_device_address(reinterpret_cast<const void*>(t.items[i * kItemCols + kItemA]), dev, "item input A", i);
      check_device_address(reinterpret_cast<const void*>(t.items[i * kItemCols + kItemB]), dev, "item input B", i);
    }
    for (int64_t m = 0; m < M; ++m) {
      check_device_address(reinterpret_cast<const void*>(t.modules[m * kModCols + kModOutA]), dev, "module output A", m);
      check_device_address(reinterpret_cast<const void*>(t.modules[m * kModCols + kModOutB]), dev, "module output B", m);
    }
    check_device_address(out.status, dev, "status", -1);
    if (out.module_status) check_device_address(out.module_status, dev, "module_status", -1);
    if (out.tau) check_device_address(out.tau, dev, "tau_out", -1);
    if (out.scales) check_device_address(out.scales, dev, "scales_out", -1);
    if (ws) check_device_address(ws, dev, "workspace", -1);
  }
  int pools = 0;
  const bool own = ws == nullptr;
  if (own) {
    check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev), "cudaDeviceGetAttribute");
    check(pools ? cudaMallocAsync(reinterpret_cast<void**>(&ws), hp.total, stream)
                : cudaMalloc(reinterpret_cast<void**>(&ws), hp.total),
          "workspace allocation");
  }
  auto release = [&]() {  // stream-ordered free; without memory pools, wait for the stream first
    if (!own) return;
    if (pools) {
      cudaFreeAsync(ws, stream);
    } else {
      cudaStreamSynchronize(stream);
      cudaFree(ws);
    }
  };
  try {
    // Pageable source: returns once the bytes are staged, so `host` may be freed after.
    check(cudaMemcpyAsync(ws, host.data(), hp.upload, cudaMemcpyHostToDevice, stream), "upload of the plan tables");
    check(cudaMemsetAsync(ws + hp.upload, 0, hp.total - hp.upload, stream), "cudaMemsetAsync");
    const DevicePlan p = hp.device_plan(ws, static_cast<float>(t.lam));
    const std::vector<int64_t> grids = hp.select_grids();
    for (size_t pass = 0; pass < grids.size(); ++pass) {  // the stream orders the passes
      select_kernel<<<unsigned(grids[pass]), kSelectThreads, 0, stream>>>(p, int(pass));
      check(cudaGetLastError(), "select_kernel launch");
    }
    fuse_a_kernel<<<unsigned(hp.n_tiles_a()), kFuseThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "fuse_a_kernel launch");
    weights_kernel<<<unsigned(M), kWeightThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "weights_kernel launch");
    fuse_b_kernel<<<unsigned(hp.n_tiles_b()), kFuseThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "fuse_b_kernel launch");
    auto copy = [&](void* dst, size_t from, size_t bytes) {
      if (dst) check(cudaMemcpyAsync(dst, ws + from, bytes, cudaMemcpyDeviceToDevice, stream), "result copy");
    };
    copy(out.status, hp.o_status, sizeof(int32_t) * W);
    copy(out.module_status, hp.o_overflow, sizeof(int32_t) * M);
    copy(out.tau, hp.o_tau, sizeof(uint32_t) * 2 * W);
    copy(out.scales, hp.o_scales, sizeof(double) * hp.S);
  } catch (...) {
    release();
    throw;
  }
  release();
}

}  // namespace cuda
}  // namespace robustmerge
