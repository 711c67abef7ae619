// Exact magnitude top-k threshold (SPEC step 1) by radix selection on magnitude keys.
//
// tau = the k-th smallest |x| (1-based), exactly torch.kthvalue(|x|.flatten(), k), found
// without sorting or copying |x|:
//   pass 1: histogram of the top 11 key bits (2048 bins, in L1), which also reveals any
//           inf/NaN (their exponent is all ones, so they land in the topmost bins);
//   pass 2: gather only the keys in the bin holding the k-th value, then nth_element on
//           those few candidates.
// A LoRA matrix (at most a few hundred KB) stays in L2 between the passes, so memory
// traffic is one read of the matrix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dtype.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace robustmerge {

constexpr int kBins = 2048;

struct Threshold {
  uint32_t key = 0;     // tau as a magnitude key; mask = key(x) >= tau
  bool finite = true;   // false: the matrix holds inf or NaN (nothing else is valid)
};

// Four interleaved sub-histograms: consecutive equal keys (ties, zeros) would otherwise
// serialise on one counter's store-to-load dependency.
template <class Tr>
void key_histogram(const typename Tr::Storage* x, int64_t n, uint32_t* hist /* [kBins] */) {
  alignas(64) uint32_t sub[4][kBins] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++sub[0][(x[i] & Tr::kMagMask) >> Tr::kShift];
    ++sub[1][(x[i + 1] & Tr::kMagMask) >> Tr::kShift];
    ++sub[2][(x[i + 2] & Tr::kMagMask) >> Tr::kShift];
    ++sub[3][(x[i + 3] & Tr::kMagMask) >> Tr::kShift];
  }
  for (; i < n; ++i) ++sub[0][(x[i] & Tr::kMagMask) >> Tr::kShift];
  for (int b = 0; b < kBins; ++b) hist[b] = sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
}

// Keys whose top bits equal `bin`, compacted into c (which has kGatherSlack spare slots:
// the stores below may write up to one vector past the last match). Returns the count.
constexpr size_t kGatherSlack = 16;

template <class Tr>
int64_t gather_bin_scalar(const typename Tr::Storage* x, int64_t begin, int64_t n, uint32_t bin, uint32_t* c,
                          int64_t m) {
  for (int64_t i = begin; i < n; ++i) {
    const uint32_t key = x[i] & Tr::kMagMask;
    c[m] = key;
    m += (key >> Tr::kShift) == bin;  // branch-free: a store per element, a count per match
  }
  return m;
}

#if defined(__AVX512F__)
// 16 keys per step: compare the top bits, compress the matches inside a register, store the
// whole vector and advance by the match count. About ten times the scalar loop's speed.
template <class Tr>
int64_t gather_bin(const typename Tr::Storage* x, int64_t n, uint32_t bin, uint32_t* c) {
  const __m512i mag = _mm512_set1_epi32(int(Tr::kMagMask));
  const __m512i want = _mm512_set1_epi32(int(bin));
  int64_t m = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i v;
    if constexpr (sizeof(typename Tr::Storage) == 4) {
      v = _mm512_loadu_si512(reinterpret_cast<const void*>(x + i));
    } else {
      v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    }
    const __m512i key = _mm512_and_si512(v, mag);
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(key, Tr::kShift), want);
    _mm512_storeu_si512(reinterpret_cast<void*>(c + m), _mm512_maskz_compress_epi32(hit, key));
    m += __builtin_popcount(unsigned(hit));
  }
  return gather_bin_scalar<Tr>(x, i, n, bin, c, m);
}
#else
template <class Tr>
int64_t gather_bin(const typename Tr::Storage* x, int64_t n, uint32_t bin, uint32_t* c) {
  return gather_bin_scalar<Tr>(x, 0, n, bin, c, 0);
}
#endif

// The rank-th smallest (0-based) of m candidate keys that share every bit above `low_bits`.
// A second histogram on the next (up to) 11 bits, over candidates that sit in L1/L2,
// narrows them further: for 16-bit keys it fixes every remaining bit; for 32-bit keys the
// few keys left in the second-level bin go to nth_element.
inline uint32_t select_in_bin(uint32_t* c, int64_t m, int64_t rank, int low_bits) {
  const int shift = low_bits > 11 ? low_bits - 11 : 0;
  const uint32_t digit_mask = (1u << (low_bits - shift)) - 1u;
  uint32_t hist[kBins] = {};
  for (int64_t i = 0; i < m; ++i) ++hist[(c[i] >> shift) & digit_mask];
  uint32_t digit = 0;
  while (rank >= hist[digit]) rank -= hist[digit++];
  const uint32_t prefix = (c[0] >> low_bits << low_bits) | (digit << shift);
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

// k < 1 keeps everything (tau = 0); the histogram pass still runs, for the finite check.
template <class Tr>
Threshold select_threshold(const typename Tr::Storage* x, int64_t n, int64_t k, std::vector<uint32_t>& candidates) {
  uint32_t hist[kBins];
  key_histogram<Tr>(x, n, hist);
  Threshold out;
  for (uint32_t b = Tr::kNonFinite >> Tr::kShift; b < kBins; ++b) {
    if (hist[b]) {
      out.finite = false;
      return out;
    }
  }
  if (k < 1) return out;
  int64_t below = 0;  // keys in bins before `bin`
  uint32_t bin = 0;
  while (below + hist[bin] < k) below += hist[bin++];
  candidates.resize(size_t(hist[bin]) + kGatherSlack);
  uint32_t* c = candidates.data();
  const int64_t m = gather_bin<Tr>(x, n, bin, c);
  out.key = select_in_bin(c, m, k - below - 1, Tr::kShift);
  return out;
}

// SPEC step 2 inputs for one task: per row of A [rows x cols], the total |A| and the kept
// |A| (key >= tau), in double so rows of huge finite values cannot overflow. Fixed lanes
// summed in a fixed order keep the result independent of the thread count.
template <class Tr>
void row_abs_sums_scalar(const typename Tr::Storage* row, int64_t begin, int64_t cols, uint32_t tau, double* t,
                         double* k) {
  constexpr int L = 8;
  int64_t j = begin;
  for (; j + L <= cols; j += L) {
    for (int l = 0; l < L; ++l) {
      const uint32_t key = row[j + l] & Tr::kMagMask;
      const double v = static_cast<double>(Tr::to_f32(static_cast<typename Tr::Storage>(key)));
      t[l] += v;
      k[l] += key >= tau ? v : 0.0;
    }
  }
  for (; j < cols; ++j) {
    const uint32_t key = row[j] & Tr::kMagMask;
    const double v = static_cast<double>(Tr::to_f32(static_cast<typename Tr::Storage>(key)));
    t[0] += v;
    k[0] += key >= tau ? v : 0.0;
  }
}

#if defined(__AVX512F__)
// 16 magnitudes per step: widen to two 8-lane double accumulators, and add the kept ones
// under the compare mask. GCC does not vectorise the scalar form (mixed 32/64-bit lanes).
template <class Tr>
int64_t row_abs_sums_avx512(const typename Tr::Storage* row, int64_t cols, uint32_t tau, double* t, double* k) {
  const __m512i mag = _mm512_set1_epi32(int(Tr::kMagMask));
  const __m512i tauv = _mm512_set1_epi32(int(tau));
  __m512d t0 = _mm512_setzero_pd(), t1 = _mm512_setzero_pd(), k0 = _mm512_setzero_pd(), k1 = _mm512_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    __m512i key;
    __m512 v;
    if constexpr (sizeof(typename Tr::Storage) == 4) {
      key = _mm512_and_si512(_mm512_loadu_si512(reinterpret_cast<const void*>(row + j)), mag);
      v = _mm512_castsi512_ps(key);
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
      key = _mm512_and_si512(_mm512_cvtepu16_epi32(raw), mag);
      if constexpr (Tr::kNonFinite == 0x7c00u) {  // fp16: exact hardware widening
        v = _mm512_cvtph_ps(_mm256_and_si256(raw, _mm256_set1_epi16(0x7fff)));
      } else {  // bf16: the upper half of a float
        v = _mm512_castsi512_ps(_mm512_slli_epi32(key, 16));
      }
    }
    const __mmask16 keep = _mm512_cmpge_epu32_mask(key, tauv);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
    t0 = _mm512_add_pd(t0, lo);
    t1 = _mm512_add_pd(t1, hi);
    k0 = _mm512_mask_add_pd(k0, __mmask8(keep), k0, lo);
    k1 = _mm512_mask_add_pd(k1, __mmask8(keep >> 8), k1, hi);
  }
  alignas(64) double buf[8];
  _mm512_store_pd(buf, _mm512_add_pd(t0, t1));
  for (int l = 0; l < 8; ++l) t[l] += buf[l];
  _mm512_store_pd(buf, _mm512_add_pd(k0, k1));
  for (int l = 0; l < 8; ++l) k[l] += buf[l];
  return j;
}
#endif

template <class Tr>
void row_abs_sums(const typename Tr::Storage* a, int64_t rows, int64_t cols, uint32_t tau, double* total,
                  double* kept) {
  for (int64_t r = 0; r < rows; ++r) {
    const typename Tr::Storage* row = a + r * cols;
    double t[8] = {}, k[8] = {};
    int64_t j = 0;
#if defined(__AVX512F__)
    j = row_abs_sums_avx512<Tr>(row, cols, tau, t, k);
#endif
    row_abs_sums_scalar<Tr>(row, j, cols, tau, t, k);
    double ts = 0.0, ks = 0.0;
    for (int l = 0; l < 8; ++l) {
      ts += t[l];
      ks += k[l];
    }
    total[r] = ts;
    kept[r] = ks;
  }
}

}  // namespace robustmerge
