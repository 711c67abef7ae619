// The per-element kernels of one SIMD code path, as a table of function pointers.
//
// simd_kernels.h is compiled once per code path (portable, AVX2, AVX-512; see dispatch.h)
// and each copy fills one Kernels table. The merge driver (robustmerge_cpu.h) and the
// selection (select.h) are plain code that calls through the table picked at run time,
// once per matrix or fusion block, so the indirect call costs nothing measurable.
//
// Every path computes bit-identical results: selection is exact, and each floating-point
// sum is done in one fixed order that all paths implement (see reduce16 and the lanes in
// simd_kernels.h), with no FMA contraction (-ffp-contract=off and explicit mul/add).
#pragma once

#include <cstdint>

namespace robustmerge {

// One pass of the bracket selection over a matrix's magnitude keys:
//   below   = #keys < lo,
//   m       = #keys in [lo, hi], those keys compacted (in order) into c,
//   max_key = the largest key (>= the dtype's kNonFinite: the matrix holds inf/NaN).
struct BracketCounts {
  int64_t below = 0;
  int64_t m = 0;
  uint32_t max_key = 0;
};

// c must have room for n + kCompactSlack keys: vector stores write whole vectors past the
// last match.
constexpr int64_t kCompactSlack = 16;

using BracketFn = BracketCounts (*)(const void* x, int64_t n, uint32_t lo, uint32_t hi, uint32_t* c);
// A [rows x cols]: with total/kept non-null, per row the sums of |A| and of kept |A|
// (key >= tau) in double; with acc non-null, acc[j] += [key(A[j]) >= tau] A[j] (float).
using APassFn = void (*)(const void* a, int64_t rows, int64_t cols, uint32_t tau, double* total, double* kept,
                         float* acc);
// B rows [rows x rank]: acc[i, c] += ([key >= tau] (B[i, c] * b_scale)) * w[c].
using BPassFn = void (*)(float* acc, const void* b, int64_t rows, int64_t rank, uint32_t tau, float b_scale,
                         const float* w);
// out[j] = lam * acc[j] in the output dtype; false when some stored value is inf.
using StoreFn = bool (*)(void* out, int32_t dtype, const float* acc, int64_t len, float lam);

struct Kernels {
  const char* name;
  BracketFn bracket[3];  // indexed by input DType code: kF32, kF16, kBF16
  APassFn a_pass[3];
  BPassFn b_pass[3];
  StoreFn store;
};

// The fixed reduction of 16 double lanes shared by every path: pairwise, lane l with l + 8,
// then l + 4, l + 2, l + 1. Lane l holds the elements j = l, l + 16, l + 32, ... in order.
inline double reduce16(const double* lane) {
  double s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = lane[l] + lane[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Compaction by shuffle (AVX2 has no compress instruction): for each 8-bit match mask, the
// lane indices of its set bits, lowest first. _mm256_permutevar8x32_epi32 with row `mask`
// moves the matching keys to the front of the vector.
struct CompactTable {
  alignas(32) uint32_t idx[256][8];
  constexpr CompactTable() : idx() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) idx[mask][n++] = uint32_t(lane);
      for (; n < 8; ++n) idx[mask][n] = 0;
    }
  }
};
inline constexpr CompactTable kCompact8{};

}  // namespace robustmerge
