// RobustMerge over a whole merge plan on a CUDA GPU: the device kernels.
//
// The plan is the same pair of int64 tables as the CPU kernel's (robustmerge_cpu.h:
// ItemCol / ModuleCol), copied to the device by the host driver (launch.cuh), plus two
// derived tables (item -> module, item -> offset of its A-row scales) and a tile table for
// the fusion. Three grouped launches cover every module of every adapter:
//
//   1. select_kernel, one block per (item, matrix): grid = 2 * n_items, block 512. SPEC
//      steps 1-3. The exact threshold is the k-th smallest magnitude key, found by radix
//      selection with 11-bit digits and a 2048-bin shared-memory histogram (8 KB): three
//      passes for 32-bit keys (bits 30..20, 19..9, 8..0), two for 16-bit keys (14..4,
//      3..0). Each pass streams the matrix from global memory; LoRA matrices (up to
//      ~700 KB) do not fit in shared memory but stay in L2 between the passes, so DRAM
//      traffic is about one read. The first pass also detects inf/NaN (keys in the
//      topmost bins). For A the block then computes the row sums of |A| and of kept |A|
//      in double (one warp per row), the ratios and the per-task clamp (lo = the
//      clamp_index-th smallest ratio).
//   2. weights_kernel, one block per module: w_t[c] = s_t[c] / sum_t s_t[c] (double, then
//      float), adapters in plan order -- the CPU kernel's formula, bit for bit.
//   3. fuse_kernel, one block per tile of 4096 output elements of A* or B*: one thread per
//      element sums the adapters in plan order in float32, exactly the CPU kernel's order
//      of operations (the build uses -fmad=false, so no FMA contraction), and stores
//      lam * acc with round-to-nearest-even into the output dtype, flagging overflow.
//
// Kernels 2 and 3 return at once when kernel 1 found a non-finite input (the outputs are
// then undefined, as in the CPU kernel; the caller raises).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "../dtype.h"
#include "../robustmerge_cpu.h"  // ItemCol, ModuleCol, Status, kBins: shared with the CPU kernel

namespace robustmerge {
namespace cuda {

constexpr int kSelectThreads = 512;
constexpr int kBinsPerThread = kBins / kSelectThreads;  // 4 consecutive bins per thread
static_assert(kBins % kSelectThreads == 0, "bins must split evenly over the threads");
constexpr int kWeightThreads = 128;
constexpr int kFuseThreads = 256;
constexpr int64_t kTile = 4096;  // fusion tile, in output elements
enum TileCol : int { kTileModule, kTileIsB, kTileStart, kTileLen, kTileCols };

// Everything the kernels read and write; every pointer is a device address.
struct DevicePlan {
  const int64_t* items;         // [n_items, kItemCols]
  const int64_t* modules;       // [n_modules, kModCols]
  const double* b_scale;        // [n_items]
  const int64_t* item_module;   // [n_items]
  const int64_t* scale_offset;  // [n_items + 1]: first A-row scale of each item
  const int64_t* tiles;         // [n_tiles, kTileCols]
  uint32_t* tau;                // [n_items, 2]: thresholds of A and B as magnitude keys
  double* scales;               // [scale_offset[n_items]]: clamped A-row scales
  float* weights;               // same layout: normalised fusion weights
  int32_t* status;              // [n_items]: Status bits
  int32_t* overflow;            // [n_modules]: 1 A* overflowed, 2 B* did
  int32_t* any_bad;             // [1]: some input held inf/NaN
  float lam;
};

struct DeviceThreshold {
  uint32_t key;
  bool finite;
};

struct SelectShared {
  uint32_t hist[kBins];
  typename cub::BlockScan<uint32_t, kSelectThreads>::TempStorage scan;
  uint32_t digit, below;
  double lo;
};

// One histogram pass over the keys whose bits above `prev_shift` equal `prefix`, counting
// the digit (key >> shift) & mask. Lanes of a warp holding the same digit (ties, zeros) are
// combined first, so equal keys do not serialise on one shared-memory counter. Every thread
// runs the same number of iterations, as __match_any_sync needs the whole warp.
template <class Tr>
__device__ void histogram_pass(const typename Tr::Storage* __restrict__ x, int64_t n, int shift, uint32_t mask,
                               int prev_shift, uint32_t prefix, uint32_t* hist) {
  constexpr uint32_t kNone = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    uint32_t digit = kNone;
    if (i < n) {
      const uint32_t key = uint32_t(__ldg(x + i)) & Tr::kMagMask;
      if ((key >> prev_shift) == prefix) digit = (key >> shift) & mask;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (digit != kNone && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
  }
}

// sh.digit = the digit holding the rank-th (0-based) counted key, sh.below = keys in
// smaller digits. Each thread owns kBinsPerThread consecutive bins; a block-wide exclusive
// scan of their counts finds the one thread whose range holds the rank.
__device__ inline void find_digit(SelectShared& sh, uint32_t rank) {
  const int first = threadIdx.x * kBinsPerThread;
  uint32_t local = 0;
  for (int b = 0; b < kBinsPerThread; ++b) local += sh.hist[first + b];
  uint32_t excl = 0;
  cub::BlockScan<uint32_t, kSelectThreads>(sh.scan).ExclusiveSum(local, excl);
  if (excl <= rank && rank - excl < local) {
    uint32_t below = excl;
    int d = first;
    while (below + sh.hist[d] <= rank) below += sh.hist[d++];
    sh.digit = uint32_t(d);
    sh.below = below;
  }
  __syncthreads();
}

// tau = the k-th smallest magnitude key of x[0..n) (1-based; k < 1: tau = 0, everything
// kept), or finite = false when x holds inf/NaN. Same result as select.h's select_threshold.
template <class Tr>
__device__ DeviceThreshold select_threshold(const typename Tr::Storage* __restrict__ x, int64_t n, int64_t k,
                                            SelectShared& sh) {
  constexpr bool kWide = sizeof(typename Tr::Storage) == 4;
  constexpr int kPasses = kWide ? 3 : 2;
  static_assert((kWide ? 20 : 4) == Tr::kShift, "first pass digit = the CPU histogram's bins");
  uint32_t prefix = 0;          // the key bits above prev, known so far
  int prev = kWide ? 31 : 15;   // every magnitude key is below 2^prev
  uint32_t rank = k >= 1 ? uint32_t(k - 1) : 0u;
  for (int p = 0; p < kPasses; ++p) {
    const int shift = kWide ? (p == 0 ? 20 : p == 1 ? 9 : 0) : (p == 0 ? 4 : 0);
    const uint32_t mask = (1u << (prev - shift)) - 1u;
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    histogram_pass<Tr>(x, n, shift, mask, prev, prefix, sh.hist);
    __syncthreads();
    if (p == 0) {
      bool bad = false;  // inf/NaN: exponent all ones, the topmost bins
      for (int b = 0; b < kBinsPerThread; ++b) {
        const int bin = threadIdx.x * kBinsPerThread + b;
        bad |= bin >= int(Tr::kNonFinite >> Tr::kShift) && sh.hist[bin] != 0;
      }
      if (__syncthreads_or(bad)) return {0u, false};
      if (k < 1) return {0u, true};
    }
    find_digit(sh, rank);
    const uint32_t digit = sh.digit;
    rank -= sh.below;
    prefix = (prefix << (prev - shift)) | digit;
    prev = shift;
    __syncthreads();  // every thread has read sh.digit / sh.below before they are reused
  }
  return {prefix, true};  // after the last pass (shift 0) the prefix is the whole key
}

// SPEC steps 2-3 for one A [r x n] with threshold tau: s[row] = total / kept (1 where the
// kept mass is 0), then s = max(s, lo) with lo = the clamp_index-th smallest s. Row sums
// are double, one warp per row with a fixed reduction tree (deterministic run to run).
template <class Tr>
__device__ void row_scales(const typename Tr::Storage* __restrict__ a, int64_t r, int64_t n, uint32_t tau,
                           int64_t clamp_index, double* s, SelectShared& sh) {
  using S = typename Tr::Storage;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int64_t row = warp; row < r; row += warps) {
    const S* x = a + row * n;
    double total = 0.0, kept = 0.0;
    for (int64_t j = lane; j < n; j += 32) {
      const uint32_t key = uint32_t(__ldg(x + j)) & Tr::kMagMask;
      const double v = static_cast<double>(Tr::to_f32(static_cast<S>(key)));
      total += v;
      kept += key >= tau ? v : 0.0;
    }
    for (int o = 16; o > 0; o >>= 1) {
      total += __shfl_xor_sync(0xffffffffu, total, o);
      kept += __shfl_xor_sync(0xffffffffu, kept, o);
    }
    if (lane == 0) s[row] = kept > 0.0 ? total / kept : 1.0;
  }
  __syncthreads();  // the block's global writes to s are visible to the whole block
  // lo: the row whose rank in (value, row index) order is clamp_index; exactly one row.
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) {
    const double v = s[i];
    int64_t before = 0;
    for (int64_t j = 0; j < r; ++j) {
      const double u = s[j];
      before += (u < v) || (u == v && j < i);
    }
    if (before == clamp_index) sh.lo = v;
  }
  __syncthreads();
  const double lo = sh.lo;
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) s[i] = s[i] < lo ? lo : s[i];  // std::max(s, lo)
}

template <class Tr>
__device__ void select_item(const DevicePlan& p, int64_t i, bool is_b, SelectShared& sh) {
  const int64_t* it = p.items + i * kItemCols;
  const int64_t* md = p.modules + p.item_module[i] * kModCols;
  const int64_t r = md[kModRank];
  const auto* x = reinterpret_cast<const typename Tr::Storage*>(it[is_b ? kItemB : kItemA]);
  const int64_t n = is_b ? md[kModOut] * r : r * md[kModIn];
  const DeviceThreshold th = select_threshold<Tr>(x, n, it[is_b ? kItemKB : kItemKA], sh);
  if (threadIdx.x == 0) {
    p.tau[2 * i + (is_b ? 1 : 0)] = th.key;
    if (!th.finite) {
      atomicOr(p.status + i, is_b ? int32_t(kBNonFinite) : int32_t(kANonFinite));
      atomicOr(p.any_bad, 1);
    }
  }
  if (th.finite && !is_b)
    row_scales<Tr>(x, r, md[kModIn], th.key, md[kModClampIndex], p.scales + p.scale_offset[i], sh);
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(DevicePlan p) {
  __shared__ SelectShared sh;
  const int64_t i = blockIdx.x >> 1;
  const bool is_b = blockIdx.x & 1;
  switch (int32_t(p.items[i * kItemCols + (is_b ? kItemBDtype : kItemADtype)])) {
    case kF32: select_item<F32>(p, i, is_b, sh); break;
    case kF16: select_item<F16>(p, i, is_b, sh); break;
    case kBF16: select_item<BF16>(p, i, is_b, sh); break;
    default: break;  // excluded by host validation
  }
}

// w_t[c] = s_t[c] / sum_t s_t[c], adapters in plan order (as CpuMerge::fusion_weights).
__global__ void __launch_bounds__(kWeightThreads) weights_kernel(DevicePlan p) {
  if (*p.any_bad) return;
  const int64_t* md = p.modules + int64_t(blockIdx.x) * kModCols;
  const int64_t r = md[kModRank], first = md[kModFirst], members = md[kModMembers];
  for (int64_t c = threadIdx.x; c < r; c += blockDim.x) {
    double sum = 0.0;
    for (int64_t t = 0; t < members; ++t) sum += p.scales[p.scale_offset[first + t] + c];
    for (int64_t t = 0; t < members; ++t) {
      const int64_t at = p.scale_offset[first + t] + c;
      p.weights[at] = static_cast<float>(p.scales[at] / sum);
    }
  }
}

// acc += [key(x[j]) >= tau] x[j]  (fuse.h accumulate_masked, one element)
template <class Tr>
__device__ __forceinline__ float add_masked(float acc, const void* base, int64_t j, uint32_t tau) {
  const auto s = __ldg(static_cast<const typename Tr::Storage*>(base) + j);
  const float v = Tr::to_f32(s);
  return __fadd_rn(acc, (uint32_t(s & Tr::kMagMask) >= tau) ? v : 0.0f);
}

// acc += ([key >= tau] x[j] * b_scale) * w  (fuse.h accumulate_masked_weighted, one element)
template <class Tr>
__device__ __forceinline__ float add_masked_weighted(float acc, const void* base, int64_t j, uint32_t tau,
                                                     float b_scale, float w) {
  const auto s = __ldg(static_cast<const typename Tr::Storage*>(base) + j);
  const float v = (uint32_t(s & Tr::kMagMask) >= tau) ? __fmul_rn(Tr::to_f32(s), b_scale) : 0.0f;
  return __fadd_rn(acc, __fmul_rn(v, w));
}

// out[j] = lam * acc in the output dtype (fuse.h store_scaled, one element); true on overflow.
__device__ __forceinline__ bool store_one(void* out, int64_t od, int64_t j, float lam, float acc) {
  const float v = __fmul_rn(lam, acc);
  switch (od) {
    case kF32:
      static_cast<float*>(out)[j] = v;
      return (f32_to_bits(v) & 0x7f800000u) == 0x7f800000u;
    case kBF16: {
      const uint16_t h = f32_to_bf16(v);
      static_cast<uint16_t*>(out)[j] = h;
      return (h & 0x7f80u) == 0x7f80u;
    }
    case kF16: {
      const uint16_t h = f32_to_f16(v);
      static_cast<uint16_t*>(out)[j] = h;
      return (h & 0x7c00u) == 0x7c00u;
    }
    default:  // kF64
      static_cast<double*>(out)[j] = static_cast<double>(v);
      return (f32_to_bits(v) & 0x7f800000u) == 0x7f800000u;
  }
}

__global__ void __launch_bounds__(kFuseThreads) fuse_kernel(DevicePlan p) {
  if (*p.any_bad) return;
  const int64_t* tile = p.tiles + int64_t(blockIdx.x) * kTileCols;
  const int64_t m = tile[kTileModule], start = tile[kTileStart], len = tile[kTileLen];
  const bool is_b = tile[kTileIsB] != 0;
  const int64_t* md = p.modules + m * kModCols;
  const int32_t r = int32_t(md[kModRank]);
  const int64_t first = md[kModFirst], last = first + md[kModMembers];
  void* out = reinterpret_cast<void*>(md[is_b ? kModOutB : kModOutA]);
  bool overflow = false;
  for (int64_t e = threadIdx.x; e < len; e += blockDim.x) {
    const int64_t j = start + e;  // element of A* [r, n] or B* [m, r], row-major
    float acc = 0.0f;
    if (is_b) {
      const int32_t c = int32_t(j % r);
      for (int64_t i = first; i < last; ++i) {
        const int64_t* it = p.items + i * kItemCols;
        const void* x = reinterpret_cast<const void*>(it[kItemB]);
        const uint32_t tau = p.tau[2 * i + 1];
        const float bs = static_cast<float>(p.b_scale[i]);
        const float w = p.weights[p.scale_offset[i] + c];
        switch (it[kItemBDtype]) {
          case kF32: acc = add_masked_weighted<F32>(acc, x, j, tau, bs, w); break;
          case kF16: acc = add_masked_weighted<F16>(acc, x, j, tau, bs, w); break;
          default: acc = add_masked_weighted<BF16>(acc, x, j, tau, bs, w); break;
        }
      }
    } else {
      for (int64_t i = first; i < last; ++i) {
        const int64_t* it = p.items + i * kItemCols;
        const void* x = reinterpret_cast<const void*>(it[kItemA]);
        const uint32_t tau = p.tau[2 * i];
        switch (it[kItemADtype]) {
          case kF32: acc = add_masked<F32>(acc, x, j, tau); break;
          case kF16: acc = add_masked<F16>(acc, x, j, tau); break;
          default: acc = add_masked<BF16>(acc, x, j, tau); break;
        }
      }
    }
    overflow |= store_one(out, md[kModOutDtype], j, p.lam, acc);
  }
  if (__syncthreads_or(overflow) && threadIdx.x == 0) atomicOr(p.overflow + m, is_b ? 2 : 1);
}

}  // namespace cuda
}  // namespace robustmerge
