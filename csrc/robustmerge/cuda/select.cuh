// docs/ALGORITHM.md §3 step 1 on the GPU: the exact magnitude threshold of every matrix of the plan, one
// block per (item, matrix) (grid = 2 * n_items, block kSelectThreads).
//
// tau = the k-th smallest magnitude key, by radix selection with 11-bit digits and a
// 2048-bin shared-memory histogram: digits 30..20, 19..9, 8..0 for float32 keys, 14..4,
// 3..0 for 16-bit keys. What each pass reads:
//
//   pass 1   the whole matrix, 16-byte vectors (kUnroll in flight per thread), scalar
//            head/tail; also the inf/NaN check (keys in the topmost bins);
//   pass 2   the whole matrix again, counting only keys in pass 1's bin; for float32 it
//            also writes exactly those keys (their number is pass 1's count of that bin,
//            so it is known before the pass) to shared memory when <= kCandidates;
//   pass 3   (float32 only) the candidates in shared memory, or the matrix when they did
//            not fit.
//
// So a 16-bit matrix is read twice and a float32 one twice plus a few KB from shared
// memory (before: 2 and 3 scalar passes, plus one more over A for its row sums, which now
// happen in the A fusion, fuse.cuh). The result is the same key select.h finds: the
// digit of the rank-th key is fixed pass by pass from exact counts, whatever the order in
// which keys are counted.
#pragma once

#include <cub/block/block_scan.cuh>

#include "device_plan.cuh"

namespace robustmerge {
namespace cuda {

struct DeviceThreshold {
  uint32_t key;
  bool finite;
};

struct SelectShared {
  uint32_t hist[kBins];
  uint32_t cand[kCandidates];
  typename cub::BlockScan<uint32_t, kSelectThreads>::TempStorage scan;
  uint32_t digit, below, in_digit;
  uint32_t n_cand;       // keys appended to cand in this pass
  uint32_t n_cand_read;  // keys in cand for pass 3
};

// Calls f(key, valid) for every magnitude key of x[0..n), each key once with valid = true,
// and with the whole warp converged at every call (f may use warp-synchronous intrinsics):
// every thread makes the same number of calls, padding with valid = false. Keys before the
// first 16-byte boundary (head) and after the last whole vector (tail) are fewer than
// 2 * 16 / sizeof(key), one per thread in a single round; the body is 16-byte vectors.
template <class Tr, class F>
__device__ __forceinline__ void for_each_key(const typename Tr::Storage* __restrict__ x, int64_t n, F&& f) {
  using S = typename Tr::Storage;
  constexpr int kVec = 16 / sizeof(S);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  // torch storage is element aligned; if an address were not, everything goes one by one.
  int64_t head = addr % sizeof(S) ? n : int64_t(((16 - addr % 16) % 16) / sizeof(S));
  if (head > n) head = n;
  const int64_t n_vec = (n - head) / kVec;
  const int64_t body_end = head + n_vec * kVec;
  const int64_t n_scalar = head + (n - body_end);
  for (int64_t base = 0; base < n_scalar; base += blockDim.x) {  // one round unless unaligned
    const int64_t s = base + threadIdx.x;
    const int64_t i = s < head ? s : body_end + (s - head);
    const bool valid = s < n_scalar;
    f(valid ? uint32_t(__ldg(x + i)) & Tr::kMagMask : 0u, valid);
  }
  const uint4* v = reinterpret_cast<const uint4*>(x + head);
  const int64_t step = int64_t(blockDim.x) * kUnroll;
  for (int64_t base = 0; base < n_vec; base += step) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll vectors in flight
      const int64_t idx = base + int64_t(u) * blockDim.x + threadIdx.x;
      r[u] = idx < n_vec ? __ldg(v + idx) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = base + int64_t(u) * blockDim.x + threadIdx.x < n_vec;
      const uint32_t w[4] = {r[u].x, r[u].y, r[u].z, r[u].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if constexpr (sizeof(S) == 4) {
          f(w[q] & Tr::kMagMask, valid);
        } else {  // little endian: the lower half is the element with the lower index
          f(w[q] & Tr::kMagMask, valid);
          f((w[q] >> 16) & Tr::kMagMask, valid);
        }
      }
    }
  }
}

// Counts the digit (key >> shift) & mask of a key whose bits from prev_shift up equal
// `prefix`. Lanes of a warp holding the same digit (ties, zeros, crowded exponents) are
// combined first, so equal digits do not serialise on one shared-memory counter.
__device__ __forceinline__ void count_key(uint32_t key, bool valid, int shift, uint32_t mask, int prev_shift,
                                          uint32_t prefix, uint32_t* hist) {
  constexpr uint32_t kNone = 0xffffffffu;
  const uint32_t digit = valid && (key >> prev_shift) == prefix ? (key >> shift) & mask : kNone;
  const unsigned peers = __match_any_sync(0xffffffffu, digit);
  if (digit != kNone && int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
}

// Appends `key` to sh.cand when `take` (one shared atomic per warp, not per key). The
// order of the candidates does not matter: pass 3 only counts them.
__device__ __forceinline__ void keep_candidate(uint32_t key, bool take, SelectShared& sh) {
  const unsigned takers = __ballot_sync(0xffffffffu, take);
  if (!takers) return;
  const int lane = threadIdx.x & 31, leader = __ffs(takers) - 1;
  uint32_t slot = 0;
  if (lane == leader) slot = atomicAdd(&sh.n_cand, uint32_t(__popc(takers)));
  slot = __shfl_sync(0xffffffffu, slot, leader);
  if (take) sh.cand[slot + __popc(takers & ((1u << lane) - 1u))] = key;
}

// sh.digit = the digit holding the rank-th (0-based) counted key, sh.below = keys in
// smaller digits, sh.in_digit = keys in that digit. Each thread owns kBinsPerThread
// consecutive bins; a block-wide exclusive scan of their counts finds the one thread
// whose range holds the rank.
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
    sh.in_digit = sh.hist[d];
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
  uint32_t prefix = 0;         // the key bits above prev, known so far
  int prev = kWide ? 31 : 15;  // every magnitude key is below 2^prev
  uint32_t rank = k >= 1 ? uint32_t(k - 1) : 0u;
  bool from_candidates = false;  // pass 3 reads sh.cand instead of x
  for (int p = 0; p < kPasses; ++p) {
    const int shift = kWide ? (p == 0 ? 20 : p == 1 ? 9 : 0) : (p == 0 ? 4 : 0);
    const uint32_t mask = (1u << (prev - shift)) - 1u;
    // Pass 2 of float32 keeps the keys of pass 1's digit, if they fit (count known: in_digit).
    const bool capture = kWide && p == 1 && sh.in_digit <= uint32_t(kCandidates);
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh.hist[b] = 0;
    if (threadIdx.x == 0) sh.n_cand = 0;
    __syncthreads();
    if (from_candidates) {
      const int64_t nc = sh.n_cand_read;
      for (int64_t base = 0; base < nc; base += blockDim.x) {
        const int64_t i = base + threadIdx.x;
        const bool valid = i < nc;
        count_key(valid ? sh.cand[i] : 0u, valid, shift, mask, prev, prefix, sh.hist);
      }
    } else {
      for_each_key<Tr>(x, n, [&](uint32_t key, bool valid) {
        count_key(key, valid, shift, mask, prev, prefix, sh.hist);
        if (capture) keep_candidate(key, valid && (key >> prev) == prefix, sh);
      });
    }
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
    if (capture) {
      from_candidates = true;  // every key of pass 1's digit is in sh.cand (sh.n_cand == in_digit)
      if (threadIdx.x == 0) sh.n_cand_read = sh.n_cand;
    }
    find_digit(sh, rank);  // ends with __syncthreads: sh.n_cand_read is visible too
    const uint32_t digit = sh.digit;
    rank -= sh.below;
    prefix = (prefix << (prev - shift)) | digit;
    prev = shift;
    __syncthreads();  // every thread has read sh.digit / sh.below before they are reused
  }
  return {prefix, true};  // after the last pass (shift 0) the prefix is the whole key
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

}  // namespace cuda
}  // namespace robustmerge
