// What the CUDA kernels share: the device copy of the plan (DevicePlan), the launch
// constants, and the 16-byte vector loads every kernel streams its inputs with.
//
// Why vectors: one scalar 2- or 4-byte load per thread per iteration keeps too few bytes in
// flight to cover DRAM latency (Little's law on an H100: ~3.3 TB/s x ~0.6 us = ~2 MB in
// flight, ~15 KB per SM). A 512-thread block issuing 4 x 16-byte loads per thread has
// 32 KB in flight, so even one resident block per SM can stream at full bandwidth.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dtype.h"
#include "../plan_tables.h"

namespace robustmerge {
namespace cuda {

constexpr int kBins = 2048;  // 11-bit digits, as select.h's histogram (first pass = its bins)
constexpr int kSelectThreads = 512;
constexpr int kBinsPerThread = kBins / kSelectThreads;  // 4 consecutive bins per thread
static_assert(kBins % kSelectThreads == 0, "bins must split evenly over the threads");
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread in the selection passes
// Candidate keys of the second float32 pass kept in shared memory (24 KB): the third pass
// then reads them instead of the matrix. Above this count it streams the matrix again.
constexpr int kCandidates = 6144;
// Split selection (select.cuh, split_pass): a matrix of more than `split_elems` keys (the
// launcher's argument; kDefaultSplitElems unless the caller says otherwise) is not selected
// by one block but by ceil(n / kSplitSlice) blocks per pass, each counting one contiguous
// slice. Slice: 32,768 keys = 64 KB of bf16, 128 KB of float32, i.e. 2 or 4 rounds of
// kUnroll 16-byte loads per thread: enough work to amortise what a block adds (zeroing its
// bins, at most kBins global atomics for its non-empty bins, one arrival), while a 512,000-key
// matrix (a rank-16 LoRA factor of a 32,000-token embed_tokens / lm_head) spreads over 16 blocks.
constexpr int64_t kSplitSlice = 32768;
// Default threshold, 2^18 keys. One-block selection is the better schedule when a plan has
// many matrices of similar size (llava-7b T = 8: 3,584 of them, ~27 per SM of an H100): it
// reads a float32 matrix twice instead of three times and needs no extra launches. It leaves
// SMs idle when a few matrices are much larger than the rest, since each one is a block's
// serial work. 2^18 is ~2.9x the mean matrix of a rank-16 llava-7b plan (89 K keys) and above
// its largest regular ones (16 x 11,008 = 176 K), but below the 512,000-key vocabulary
// factors, so a plan of ordinary layers is unchanged and the outliers are split.
constexpr int64_t kDefaultSplitElems = int64_t(1) << 18;
constexpr int kSplitPasses = 3;  // a histogram and an arrival counter per pass (float32: 3 digits)
constexpr int kWeightThreads = 128;
constexpr int kFuseThreads = 256;
constexpr int kElemsPerThread = 8;  // fusion: one 16-byte vector of 16-bit values, two of float32
constexpr int64_t kTile = int64_t(kFuseThreads) * kElemsPerThread;  // 2048 output elements per block
constexpr int kStage = 8;  // fusion: items whose loads are issued before their fixed-order sum
constexpr int kStagedRank = 64;  // B fusion: weights staged in shared memory up to this rank
// Fusion tiles: A* tiles are segments of <= kTile elements of one row (so the block also
// sums that row of |A| for the A-row scales), B* tiles flat ranges of kTile elements. They
// are numbered module by module; a block finds its module by binary search in the
// per-module first-tile table (M + 1 entries, not a row per tile to upload).

inline __host__ __device__ bool split_matrix(int64_t n, int64_t split_elems) { return n > split_elems; }
inline __host__ __device__ int64_t split_blocks(int64_t n) { return (n + kSplitSlice - 1) / kSplitSlice; }

// What the last block of a split matrix's pass p leaves for pass p + 1 (one per pass, so a
// pass never reads the slot its own last block writes).
struct SplitState {
  uint32_t prefix;  // key bits found so far
  uint32_t rank;    // the rank left among the keys with that prefix
  uint32_t active;  // 1: digits left to find (0: done, inf/NaN, or k < 1)
  uint32_t unused;
};

// Everything the kernels read and write; every pointer is a device address.
struct DevicePlan {
  const int64_t* items;         // [n_items, kItemCols]
  const int64_t* modules;       // [n_modules, kModCols]
  const double* b_scale;        // [n_items]
  const int64_t* item_module;   // [n_items]
  const int64_t* scale_offset;  // [n_items + 1]: first A-row scale of each item
  const int64_t* part_offset;   // [n_items + 1]: first row-sum partial of each item (rank x segments)
  const int64_t* tile_first_a;  // [n_modules + 1]: first A* tile of each module
  const int64_t* tile_first_b;  // [n_modules + 1]: first B* tile of each module
  int64_t n_items;
  int64_t n_modules;
  int64_t split_elems;          // matrices with more keys take the split selection
  const int64_t* split_mat;     // [n_split]: matrix (2 * item + is_b) of each split matrix
  const int64_t* split_first;   // [n_split + 1]: first split block of each (increasing)
  int64_t n_split;
  uint32_t* split_hist;         // [n_split, kSplitPasses, kBins]: global histograms (zeroed)
  uint32_t* split_arrive;       // [n_split, kSplitPasses]: blocks that have added theirs (zeroed)
  SplitState* split_state;      // [n_split, kSplitPasses]: written by each pass's last block
  uint32_t* tau;                // [n_items, 2]: thresholds of A and B as magnitude keys
  double* partials;             // [part_offset[n_items], 2]: per (row, segment) sums of |A| and kept |A|
  double* scales;               // [scale_offset[n_items]]: clamped A-row scales
  double* lo;                   // [n_items]: the clamp bound of each task
  float* weights;               // same layout: normalised fusion weights
  int32_t* status;              // [n_items]: Status bits
  int32_t* overflow;            // [n_modules]: 1 A* overflowed, 2 B* did
  int32_t* any_bad;             // [1]: some input held inf/NaN
  float lam;
};

inline __host__ __device__ int64_t segments_per_row(int64_t in_features) { return (in_features + kTile - 1) / kTile; }
inline __host__ __device__ int64_t tiles_a(int64_t rank, int64_t in_features) { return rank * segments_per_row(in_features); }
inline __host__ __device__ int64_t tiles_b(int64_t rank, int64_t out_features) {
  return (rank * out_features + kTile - 1) / kTile;
}

// The module whose tiles [first[m], first[m + 1]) hold `tile` (first[0] = 0, increasing);
// also the split matrix of a split-selection block (first = DevicePlan::split_first).
__device__ __forceinline__ int64_t tile_module(const int64_t* first, int64_t n_modules, int64_t tile) {
  int64_t lo = 0, hi = n_modules - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (__ldg(first + mid) <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Eight consecutive values x[j..j+8) of a kernel input type (n_valid of them inside the
// range), loaded with 16-byte vectors when the address allows, else one by one. Raw bits
// only; decode with key()/value().
struct Raw8 {
  uint32_t w[8];  // float32: one value per word; 16-bit: value e in half e % 2 of word e / 2
};

template <class Tr>
__device__ __forceinline__ Raw8 load8(const void* base, int64_t j, int n_valid) {
  using S = typename Tr::Storage;
  const S* x = static_cast<const S*>(base) + j;
  Raw8 r;
  const bool vec = n_valid == 8 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  if (vec) {
    const uint4* v = reinterpret_cast<const uint4*>(x);
    const uint4 lo = __ldg(v);
    r.w[0] = lo.x, r.w[1] = lo.y, r.w[2] = lo.z, r.w[3] = lo.w;
    if constexpr (sizeof(S) == 4) {
      const uint4 hi = __ldg(v + 1);
      r.w[4] = hi.x, r.w[5] = hi.y, r.w[6] = hi.z, r.w[7] = hi.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) r.w[e] = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e < n_valid) {
        const uint32_t s = uint32_t(__ldg(x + e));
        if constexpr (sizeof(S) == 4) r.w[e] = s;
        else r.w[e / 2] |= s << (16 * (e % 2));
      }
    }
  }
  return r;
}

template <class Tr>
__device__ __forceinline__ typename Tr::Storage raw_at(const Raw8& r, int e) {
  if constexpr (sizeof(typename Tr::Storage) == 4) return r.w[e];
  else return static_cast<uint16_t>(r.w[e / 2] >> (16 * (e % 2)));
}

}  // namespace cuda
}  // namespace robustmerge
