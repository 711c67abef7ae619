// docs/ALGORITHM.md §3 step 1 on the GPU: the exact magnitude threshold of every matrix of the
// plan. A matrix of at most DevicePlan::split_elems keys is selected by one block (all its
// passes in that block); a larger one by several blocks per pass (the split path, below).
//
// tau = the k-th smallest magnitude key, by radix selection with 11-bit digits and a
// 2048-bin shared-memory histogram: digits 30..20, 19..9, 8..0 for float32 keys, 14..4,
// 3..0 for 16-bit keys. What each pass of the one-block path reads:
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
//
// Split path (matrices of more than split_elems keys): one launch per pass. In pass p each
// of the matrix's split_blocks(n) blocks counts its kSplitSlice-key slice into shared memory
// and adds the non-empty bins to the matrix's pass-p global histogram (relaxed atomics); the
// block that arrives last (fence + atomic counter, the CUDA Programming Guide's "last block"
// pattern) then holds the complete histogram, fixes the digit exactly as the one-block path
// does (find_digit on the same counts) and leaves prefix and rank for the next launch, or
// publishes tau after the last digit. Why this design: blocks of one launch never wait for
// each other (a spin-wait would need all of a matrix's blocks co-resident, which CUDA does
// not promise outside cooperative launches), the kernel boundary is the only cross-pass
// synchronisation, and every histogram, counter and state slot is used by one pass only,
// so the workspace memset is all the zeroing needed and nothing is reused. The cost: 1-2
// more launches, and a split float32 matrix is read three times: its third pass streams the
// matrix again instead of the one-block path's shared-memory candidates (a global candidate
// buffer, as the Triton backend keeps, would save that read; left out to keep the split path
// to histograms and one state word per pass). Spread over many SMs the extra read is still
// predicted to be far cheaper than one block's serial passes (benchmarks/README.md).
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
  uint32_t last;         // split path: this block arrived last for its matrix
};

// The digits of a float32 (kWide) or 16-bit key, the same for both paths: pass p counts
// bits [shift(p), prev(p)) of the keys whose bits from prev(p) up equal the prefix so far.
template <bool kWide>
struct Digits {
  static constexpr int kPasses = kWide ? 3 : 2;
  static_assert(kPasses <= kSplitPasses, "a split histogram per pass");
  __device__ static int shift(int p) { return kWide ? (p == 0 ? 20 : p == 1 ? 9 : 0) : (p == 0 ? 4 : 0); }
  __device__ static int prev(int p) { return p == 0 ? (kWide ? 31 : 15) : shift(p - 1); }  // keys < 2^prev(0)
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

// Whether the pass-1 histogram in sh.hist has a key in the inf/NaN bins (exponent all ones:
// the topmost bins). Block-wide; every thread gets the answer.
template <class Tr>
__device__ __forceinline__ bool any_non_finite(const SelectShared& sh) {
  bool bad = false;
  for (int b = 0; b < kBinsPerThread; ++b) {
    const int bin = threadIdx.x * kBinsPerThread + b;
    bad |= bin >= int(Tr::kNonFinite >> Tr::kShift) && sh.hist[bin] != 0;
  }
  return __syncthreads_or(bad);
}

// tau = the k-th smallest magnitude key of x[0..n) (1-based; k < 1: tau = 0, everything
// kept), or finite = false when x holds inf/NaN. Same result as select.h's select_threshold.
template <class Tr>
__device__ DeviceThreshold select_threshold(const typename Tr::Storage* __restrict__ x, int64_t n, int64_t k,
                                            SelectShared& sh) {
  constexpr bool kWide = sizeof(typename Tr::Storage) == 4;
  using D = Digits<kWide>;
  static_assert((kWide ? 20 : 4) == Tr::kShift, "first pass digit = the CPU histogram's bins");
  uint32_t prefix = 0;  // the key bits above prev, known so far
  uint32_t rank = k >= 1 ? uint32_t(k - 1) : 0u;
  bool from_candidates = false;  // pass 3 reads sh.cand instead of x
  for (int p = 0; p < D::kPasses; ++p) {
    const int shift = D::shift(p), prev = D::prev(p);
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
      if (any_non_finite<Tr>(sh)) return {0u, false};
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
    __syncthreads();  // every thread has read sh.digit / sh.below before they are reused
  }
  return {prefix, true};  // after the last pass (shift 0) the prefix is the whole key
}

// One matrix of the plan: matrix `mat` = 2 * item + (B ? 1 : 0), as tau is laid out.
struct MatrixRef {
  const void* x;
  int64_t n, k;
  int32_t dtype;
};

__device__ __forceinline__ MatrixRef matrix_ref(const DevicePlan& p, int64_t mat) {
  const int64_t i = mat >> 1;
  const bool is_b = mat & 1;
  const int64_t* it = p.items + i * kItemCols;
  const int64_t* md = p.modules + p.item_module[i] * kModCols;
  const int64_t r = md[kModRank];
  return {reinterpret_cast<const void*>(it[is_b ? kItemB : kItemA]), is_b ? md[kModOut] * r : r * md[kModIn],
          it[is_b ? kItemKB : kItemKA], int32_t(it[is_b ? kItemBDtype : kItemADtype])};
}

// Calls f(Traits{}) for a kernel input dtype (others are excluded by host validation).
template <class F>
__device__ __forceinline__ void with_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case kF32: f(F32{}); break;
    case kF16: f(F16{}); break;
    case kBF16: f(BF16{}); break;
    default: break;
  }
}

// The result of matrix `mat` (one thread): its threshold, and its status bit on inf/NaN.
__device__ __forceinline__ void publish(const DevicePlan& p, int64_t mat, DeviceThreshold th) {
  p.tau[mat] = th.key;
  if (!th.finite) {
    atomicOr(p.status + (mat >> 1), (mat & 1) ? int32_t(kBNonFinite) : int32_t(kANonFinite));
    atomicOr(p.any_bad, 1);
  }
}

// The split path's pass `pass` for one block: slice `slice` of split matrix `s` (its
// matrix `mat`, `n_blocks` slices). See the top of this file.
template <class Tr>
__device__ void split_pass(const DevicePlan& p, int pass, int64_t s, int64_t slice, int64_t n_blocks, int64_t mat,
                           const MatrixRef& m, SelectShared& sh) {
  using D = Digits<sizeof(typename Tr::Storage) == 4>;
  if (pass >= D::kPasses) return;  // a 16-bit matrix in the float32-only third launch
  uint32_t prefix = 0, rank = m.k >= 1 ? uint32_t(m.k - 1) : 0u;
  if (pass > 0) {  // written by the previous launch's last block: visible across the kernel boundary
    const SplitState st = p.split_state[s * kSplitPasses + pass - 1];
    if (!st.active) return;  // uniform over the matrix's blocks: none of them arrives below
    prefix = st.prefix;
    rank = st.rank;
  }
  const int shift = D::shift(pass), prev = D::prev(pass);
  const uint32_t mask = (1u << (prev - shift)) - 1u;
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh.hist[b] = 0;
  __syncthreads();
  const int64_t begin = slice * kSplitSlice;
  const int64_t len = m.n - begin < kSplitSlice ? m.n - begin : kSplitSlice;
  for_each_key<Tr>(static_cast<const typename Tr::Storage*>(m.x) + begin, len,
                   [&](uint32_t key, bool valid) { count_key(key, valid, shift, mask, prev, prefix, sh.hist); });
  __syncthreads();
  // Only the non-empty bins (magnitudes crowd into few of them). Relaxed atomics: the fence
  // and the arrival counter below order them before the last block's reads.
  uint32_t* hist = p.split_hist + (s * kSplitPasses + pass) * kBins;
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (sh.hist[b]) atomicAdd(hist + b, sh.hist[b]);
  __threadfence();  // release: this thread's adds are visible device-wide before the arrival
  __syncthreads();  // ... and every thread's adds precede thread 0's arrival
  if (threadIdx.x == 0) {
    __threadfence();  // the block's adds, ordered before this point by the barrier, before the arrival
    const uint32_t arrived = atomicAdd(p.split_arrive + s * kSplitPasses + pass, 1u);
    __threadfence();  // acquire: the other blocks' adds, released before their arrivals, before our reads
    sh.last = arrived == uint32_t(n_blocks - 1);
  }
  __syncthreads();
  if (!sh.last) return;  // block-uniform
  // The complete histogram: every block's adds precede its arrival, all arrivals precede
  // ours. __ldcg: the atomics live in L2; L1 is not coherent with them.
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh.hist[b] = __ldcg(hist + b);
  __syncthreads();
  if (pass == 0) {  // the one-block path's order: inf/NaN first, then k < 1 (everything kept)
    if (any_non_finite<Tr>(sh)) {
      if (threadIdx.x == 0) publish(p, mat, {0u, false});
      return;  // state stays inactive (zeroed): later launches skip the matrix
    }
    if (m.k < 1) {
      if (threadIdx.x == 0) publish(p, mat, {0u, true});
      return;
    }
  }
  find_digit(sh, rank);  // ends with __syncthreads
  if (threadIdx.x == 0) {
    prefix = (prefix << (prev - shift)) | sh.digit;
    if (shift == 0) {
      publish(p, mat, {prefix, true});  // after the last digit the prefix is the whole key
    } else {
      p.split_state[s * kSplitPasses + pass] = {prefix, rank - sh.below, 1u, 0u};
    }
  }
}

// Selection, launch `pass` (launch.cuh): blocks [0, 2 * n_items) of launch 0 are the
// one-block path, one per matrix (a split matrix's block returns at once); the remaining
// blocks of launch 0 and every block of launches 1 and 2 are split blocks, numbered split
// matrix by split matrix (split_first).
__global__ void __launch_bounds__(kSelectThreads) select_kernel(DevicePlan p, int pass) {
  __shared__ SelectShared sh;
  const int64_t one_block = pass == 0 ? 2 * p.n_items : 0;
  if (int64_t(blockIdx.x) < one_block) {
    const int64_t mat = blockIdx.x;
    const MatrixRef m = matrix_ref(p, mat);
    if (split_matrix(m.n, p.split_elems)) return;  // selected by the split blocks
    with_dtype(m.dtype, [&](auto tr) {
      using Tr = decltype(tr);
      const DeviceThreshold th =
          select_threshold<Tr>(static_cast<const typename Tr::Storage*>(m.x), m.n, m.k, sh);
      if (threadIdx.x == 0) publish(p, mat, th);
    });
    return;
  }
  const int64_t block = int64_t(blockIdx.x) - one_block;
  const int64_t s = tile_module(p.split_first, p.n_split, block);
  const int64_t first = __ldg(p.split_first + s);
  const int64_t mat = __ldg(p.split_mat + s);
  const MatrixRef m = matrix_ref(p, mat);
  with_dtype(m.dtype, [&](auto tr) {
    split_pass<decltype(tr)>(p, pass, s, block - first, __ldg(p.split_first + s + 1) - first, mat, m, sh);
  });
}

}  // namespace cuda
}  // namespace robustmerge
