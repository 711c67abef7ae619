// Exact magnitude top-k threshold (docs/ALGORITHM.md §3 step 1): tau = the k-th smallest |x| (1-based),
// exactly torch.kthvalue(|x|.flatten(), k), as a magnitude key.
//
// Sampled bracket, so that the pass over the matrix is one vector loop with no per-element
// histogram scatter:
//   1. sample 1024 keys (64 cache lines spread over the matrix) and pick lo / hi in it a few
//      standard deviations of the sample rank either side of where the k-th should fall;
//   2. one vector pass (Kernels::bracket): count keys below lo, compact the keys in
//      [lo, hi] (a few percent of them), find the largest key (inf/NaN check);
//   3. if the k-th is in the bracket (below < k <= below + m), a radix select among the
//      candidates gives it exactly; if the sample misled us (rare, or adversarial data),
//      the same pass again over the whole key range, which is always exact.
// The result never depends on the sample, only the time does; so it is the same on every
// path and thread count, and equal to the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "dtype.h"
#include "tables.h"

namespace robustmerge {

struct Threshold {
  uint32_t key = 0;    // tau as a magnitude key; mask = key(x) >= tau
  bool finite = true;  // false: the matrix holds inf or NaN (nothing else is valid)
};

inline uint32_t non_finite_key(int32_t dtype) { return dtype == kF32 ? 0x7f800000u : dtype == kF16 ? 0x7c00u : 0x7f80u; }

// The rank-th smallest (0-based) of m candidate keys that share every bit above `low_bits`.
// A histogram on the next (up to) 11 bits, over candidates that sit in L1/L2, narrows them:
// when no bits are left below the digit it is the answer; otherwise the few keys left in
// the digit's bin go to nth_element.
inline uint32_t select_in_bin(uint32_t* c, int64_t m, int64_t rank, int low_bits) {
  const int shift = low_bits > 11 ? low_bits - 11 : 0;
  const uint32_t digit_mask = (1u << (low_bits - shift)) - 1u;
  uint32_t hist[kBins] = {};
  for (int64_t i = 0; i < m; ++i) ++hist[(c[i] >> shift) & digit_mask];
  uint32_t digit = 0;
  while (rank >= hist[digit]) rank -= hist[digit++];
  const uint32_t prefix = (low_bits >= 32 ? 0u : c[0] >> low_bits << low_bits) | (digit << shift);
  if (shift == 0) return prefix;
  int64_t left = 0;  // compact the keys of that digit in place, then select among them
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t key = c[i];
    c[left] = key;
    left += ((key >> shift) & digit_mask) == digit;
  }
  std::nth_element(c, c + rank, c + left);
  return c[rank];
}

constexpr int64_t kSampleLines = 64, kSampleRun = 16, kSample = kSampleLines * kSampleRun;
constexpr int64_t kMinBracketed = 16 * kSample;  // below this, one exact pass over all keys is as cheap

// Where the sample's runs of 16 consecutive keys (one cache line of fp32) start: at
// golden-ratio positions, so rows and columns are both spread.
inline int64_t sample_start(int64_t j, int64_t n) {
  const uint64_t frac = uint64_t(j) * 0x9e3779b97f4a7c15ull;  // j * golden ratio mod 1, in 2^-64 units
  return int64_t((unsigned __int128)frac * uint64_t(n - kSampleRun) >> 64);
}

// The sample's lines are cache misses (the matrix is not read yet). The schedule calls this
// for the next matrix before working on the current one, so they arrive meanwhile; the
// bracket pass later finds them in cache too.
inline void prefetch_sample(const void* x, int32_t dtype, int64_t n) {
  if (n < kMinBracketed) return;
  const char* p = static_cast<const char*>(x);
  const int64_t size = dtype == kF32 ? 4 : 2;
  for (int64_t j = 0; j < kSampleLines; ++j) {
    __builtin_prefetch(p + sample_start(j, n) * size);
    __builtin_prefetch(p + (sample_start(j, n) + kSampleRun) * size - 1);
  }
}

// lo / hi around the k-th smallest key, from the sample.
template <class Storage>
void sample_bracket(const Storage* x, int64_t n, int64_t k, uint32_t mag_mask, uint32_t max_finite, uint32_t* lo,
                    uint32_t* hi, std::vector<uint32_t>& sample) {
  sample.resize(kSample);
  for (int64_t j = 0; j < kSampleLines; ++j) {
    const Storage* run = x + sample_start(j, n);
    for (int64_t i = 0; i < kSampleRun; ++i) sample[j * kSampleRun + i] = run[i] & mag_mask;
  }
  // Where the k-th smallest sits in the sorted sample, and a margin of 3.5 standard
  // deviations of that rank (binomial) plus slack for the runs' correlation: a miss (about
  // 1 in 1000 matrices of independent values) costs one more pass over a cached matrix.
  const double p = (double(k) - 0.5) / double(n);
  const double at = p * double(kSample);
  const double margin = 3.5 * std::sqrt(double(kSample) * p * (1.0 - p)) + 3.0;
  const int64_t lo_rank = int64_t(std::floor(at - margin)), hi_rank = int64_t(std::ceil(at + margin));
  uint32_t* s = sample.data();
  *lo = 0;
  *hi = max_finite;
  if (lo_rank >= 0) {
    std::nth_element(s, s + lo_rank, s + kSample);
    *lo = s[lo_rank];
  }
  if (hi_rank < kSample) {
    const int64_t from = lo_rank >= 0 ? lo_rank : 0;  // everything before `from` is <= lo
    std::nth_element(s + from, s + hi_rank, s + kSample);
    *hi = std::min(s[hi_rank], max_finite);  // a sampled inf/NaN: the pass reports it anyway
  }
  *lo = std::min(*lo, *hi);
}

inline int bit_length(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

// k < 1 keeps everything (tau = 0); the pass still runs, for the finite check.
// `scratch` holds the candidates (grown to n + kCompactSlack) and the sample.
inline Threshold select_threshold(const Kernels& kern, int32_t dtype, const void* x, int64_t n, int64_t k,
                                  std::vector<uint32_t>& candidates, std::vector<uint32_t>& sample) {
  const uint32_t max_finite = non_finite_key(dtype) - 1;
  const uint32_t mag_mask = dtype == kF32 ? 0x7fffffffu : 0x7fffu;
  uint32_t lo = 0, hi = max_finite;
  if (k < 1) {
    lo = hi = max_finite;  // compacts (almost) nothing: only the finite check matters
  } else if (n >= kMinBracketed) {
    if (dtype == kF32) {
      sample_bracket(static_cast<const uint32_t*>(x), n, k, mag_mask, max_finite, &lo, &hi, sample);
    } else {
      sample_bracket(static_cast<const uint16_t*>(x), n, k, mag_mask, max_finite, &lo, &hi, sample);
    }
  }
  if (candidates.size() < size_t(n + kCompactSlack)) candidates.resize(size_t(n + kCompactSlack));
  uint32_t* c = candidates.data();
  BracketCounts r = kern.bracket[dtype](x, n, lo, hi, c);
  Threshold out;
  if (r.max_key > max_finite) {
    out.finite = false;
    return out;
  }
  if (k < 1) return out;
  if (!(r.below < k && k <= r.below + r.m)) {  // the sample missed: exact over every key
    lo = 0;
    hi = max_finite;
    r = kern.bracket[dtype](x, n, lo, hi, c);
  }
  out.key = select_in_bin(c, r.m, k - r.below - 1, bit_length(lo ^ hi));
  return out;
}

}  // namespace robustmerge
