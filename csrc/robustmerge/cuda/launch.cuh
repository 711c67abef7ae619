// Host driver of the CUDA kernels (kernels.cuh): validation of the HOST copies of the plan
// tables, one workspace allocation, one upload, three launches, and copies of the results,
// all enqueued on the caller's stream. Nothing here synchronises the host with the device
// (except the brief staging copy of the pageable host tables that cudaMemcpyAsync does), so
// the caller reads the status array after the stream's work (torch does so on .cpu()).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.cuh"

namespace robustmerge {
namespace cuda {

// The CPU kernel's validation (robustmerge_cpu.h) on the host tables, reworded for this
// backend, plus the limit the device code relies on (32-bit counts and column indices).
inline void validate(const MergeTables& t) {
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

struct Outputs {         // device addresses (0: not wanted)
  int32_t* status;       // [n_items], required
  int32_t* module_status;  // [n_modules]
  uint32_t* tau;         // [n_items, 2]
  double* scales;        // items' ranks concatenated
};

// Workspace layout: an uploaded part (tables and derived tables) and a zeroed part
// (results and scratch), each array aligned to 256 bytes.
class Layout {
 public:
  size_t add(size_t bytes) {
    const size_t at = size_;
    size_ = (size_ + bytes + 255) / 256 * 256;
    return at;
  }
  size_t size() const { return size_; }

 private:
  size_t size_ = 0;
};

// Runs the merge described by the validated host tables `t` (whose item and output
// addresses are device addresses on `device`; -1: the current device) on `stream`.
inline void robustmerge_cuda(const MergeTables& t, int device, cudaStream_t stream, const Outputs& out) {
  const int64_t W = t.n_items, M = t.n_modules;
  // Derived tables, on the host: item -> module, item -> first scale, fusion tiles.
  std::vector<int64_t> item_module(W), scale_offset(W + 1, 0), tiles;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t* md = t.modules + m * kModCols;
    for (int64_t i = md[kModFirst]; i < md[kModFirst] + md[kModMembers]; ++i) item_module[i] = m;
    const int64_t r = md[kModRank];
    const int64_t sizes[2] = {r * md[kModIn], md[kModOut] * r};
    for (int64_t is_b = 0; is_b < 2; ++is_b)
      for (int64_t s = 0; s < sizes[is_b]; s += kTile) tiles.insert(tiles.end(), {m, is_b, s, std::min(kTile, sizes[is_b] - s)});
  }
  for (int64_t i = 0; i < W; ++i) scale_offset[i + 1] = scale_offset[i] + t.modules[item_module[i] * kModCols + kModRank];
  const int64_t S = scale_offset[W];
  const int64_t n_tiles = int64_t(tiles.size()) / kTileCols;

  Layout lay;
  const size_t o_items = lay.add(sizeof(int64_t) * W * kItemCols);
  const size_t o_modules = lay.add(sizeof(int64_t) * M * kModCols);
  const size_t o_bscale = lay.add(sizeof(double) * W);
  const size_t o_item_module = lay.add(sizeof(int64_t) * W);
  const size_t o_scale_offset = lay.add(sizeof(int64_t) * (W + 1));
  const size_t o_tiles = lay.add(sizeof(int64_t) * tiles.size());
  const size_t upload = lay.size();
  const size_t o_tau = lay.add(sizeof(uint32_t) * 2 * W);
  const size_t o_scales = lay.add(sizeof(double) * S);
  const size_t o_weights = lay.add(sizeof(float) * S);
  const size_t o_status = lay.add(sizeof(int32_t) * W);
  const size_t o_overflow = lay.add(sizeof(int32_t) * M);
  const size_t o_flag = lay.add(sizeof(int32_t));
  const size_t total = lay.size();

  std::vector<unsigned char> host(upload, 0);
  std::memcpy(host.data() + o_items, t.items, sizeof(int64_t) * W * kItemCols);
  std::memcpy(host.data() + o_modules, t.modules, sizeof(int64_t) * M * kModCols);
  std::memcpy(host.data() + o_bscale, t.b_scale, sizeof(double) * W);
  std::memcpy(host.data() + o_item_module, item_module.data(), sizeof(int64_t) * W);
  std::memcpy(host.data() + o_scale_offset, scale_offset.data(), sizeof(int64_t) * (W + 1));
  std::memcpy(host.data() + o_tiles, tiles.data(), sizeof(int64_t) * tiles.size());

  if (device >= 0) check(cudaSetDevice(device), "cudaSetDevice");
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
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
  int pools = 0;
  check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev), "cudaDeviceGetAttribute");
  unsigned char* ws = nullptr;
  check(pools ? cudaMallocAsync(reinterpret_cast<void**>(&ws), total, stream)
              : cudaMalloc(reinterpret_cast<void**>(&ws), total),
        "workspace allocation");
  auto release = [&]() {  // stream-ordered free; without memory pools, wait for the stream first
    if (pools) {
      cudaFreeAsync(ws, stream);
    } else {
      cudaStreamSynchronize(stream);
      cudaFree(ws);
    }
  };
  try {
    // Pageable source: returns once the bytes are staged, so `host` may be freed after.
    check(cudaMemcpyAsync(ws, host.data(), upload, cudaMemcpyHostToDevice, stream), "upload of the plan tables");
    check(cudaMemsetAsync(ws + upload, 0, total - upload, stream), "cudaMemsetAsync");
    DevicePlan p;
    p.items = reinterpret_cast<const int64_t*>(ws + o_items);
    p.modules = reinterpret_cast<const int64_t*>(ws + o_modules);
    p.b_scale = reinterpret_cast<const double*>(ws + o_bscale);
    p.item_module = reinterpret_cast<const int64_t*>(ws + o_item_module);
    p.scale_offset = reinterpret_cast<const int64_t*>(ws + o_scale_offset);
    p.tiles = reinterpret_cast<const int64_t*>(ws + o_tiles);
    p.tau = reinterpret_cast<uint32_t*>(ws + o_tau);
    p.scales = reinterpret_cast<double*>(ws + o_scales);
    p.weights = reinterpret_cast<float*>(ws + o_weights);
    p.status = reinterpret_cast<int32_t*>(ws + o_status);
    p.overflow = reinterpret_cast<int32_t*>(ws + o_overflow);
    p.any_bad = reinterpret_cast<int32_t*>(ws + o_flag);
    p.lam = static_cast<float>(t.lam);
    select_kernel<<<unsigned(2 * W), kSelectThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "select_kernel launch");
    weights_kernel<<<unsigned(M), kWeightThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "weights_kernel launch");
    fuse_kernel<<<unsigned(n_tiles), kFuseThreads, 0, stream>>>(p);
    check(cudaGetLastError(), "fuse_kernel launch");
    auto copy = [&](void* dst, size_t from, size_t bytes) {
      if (dst) check(cudaMemcpyAsync(dst, ws + from, bytes, cudaMemcpyDeviceToDevice, stream), "result copy");
    };
    copy(out.status, o_status, sizeof(int32_t) * W);
    copy(out.module_status, o_overflow, sizeof(int32_t) * M);
    copy(out.tau, o_tau, sizeof(uint32_t) * 2 * W);
    copy(out.scales, o_scales, sizeof(double) * S);
  } catch (...) {
    release();
    throw;
  }
  release();
}

}  // namespace cuda
}  // namespace robustmerge
