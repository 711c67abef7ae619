// Host driver of the CUDA kernels (kernels.cuh): from the HOST copies of the plan tables,
// validated and laid out by host_plan.cuh, one upload, the launches HostPlan::launches()
// lists (select: 1 + the split passes, see select.cuh; fuse_a, weights, fuse_b) and the
// copies of the results it lists, all enqueued on the caller's stream. Nothing here
// synchronises the host with the device (except the brief staging copy of the pageable host
// tables that cudaMemcpyAsync does), so the caller reads the status array after the
// stream's work (torch does so on .cpu()).
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

#include "../robustmerge_cpu.h"  // MergeTables, kBins (nvcc sees only tables.h of it)
#include "host_plan.cuh"           // validate, HostPlan, Launch, Outputs
#include "kernels.cuh"

namespace robustmerge {
namespace cuda {

static_assert(kBins == robustmerge::kBins, "the CUDA first pass uses the CPU histogram's bins");

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
    for (const Launch& l : hp.launches()) {  // the stream orders them
      const unsigned grid = unsigned(l.blocks);
      switch (l.kernel) {
        case Kernel::kSelect: select_kernel<<<grid, l.threads, 0, stream>>>(p, l.pass); break;
        case Kernel::kFuseA: fuse_a_kernel<<<grid, l.threads, 0, stream>>>(p); break;
        case Kernel::kWeights: weights_kernel<<<grid, l.threads, 0, stream>>>(p); break;
        case Kernel::kFuseB: fuse_b_kernel<<<grid, l.threads, 0, stream>>>(p); break;
      }
      check(cudaGetLastError(), l.what);
    }
    for (const ResultCopy& c : hp.result_copies(out))
      if (c.dst) check(cudaMemcpyAsync(c.dst, ws + c.from, c.bytes, cudaMemcpyDeviceToDevice, stream), "result copy");
  } catch (...) {
    release();
    throw;
  }
  release();
}

}  // namespace cuda
}  // namespace robustmerge
