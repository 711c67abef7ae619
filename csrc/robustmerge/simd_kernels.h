// The per-element kernels (kernel_table.h), compiled once per code path. No include guard:
// dispatch.h includes this file once per path with
//   RMK_NS      the path's namespace (portable, avx2, avx512),
//   RMK_TARGET  its function attribute (empty for portable: the build's baseline ISA),
//   RMK_LEVEL   0 portable, 1 AVX2, 2 AVX-512.
// Every function here carries RMK_TARGET, so the AVX2/AVX-512 instructions live only in
// functions the dispatcher calls after checking the CPU; the rest of the module stays
// baseline x86-64. Helpers are functions, not lambdas: a lambda does not inherit the
// target attribute of the function it is written in.
//
// Portable loops double as the vector paths' tails, and as the definition of the order of
// operations: the intrinsics below perform the same IEEE operations on the same operands
// in the same order (lane l of the 16 double lanes takes elements j = l mod 16), so all
// paths agree bit for bit.

namespace robustmerge {
namespace RMK_NS {

// ---------------------------------------------------------------- selection pass

// The selection pass is the first read of each matrix from memory. Matrices are a few
// hundred KB in different adapters' buffers, so the hardware prefetcher restarts often
// (at every 4 KB page); asking for the line 2 KB ahead keeps enough reads in flight.
template <class Storage>
RMK_TARGET inline void prefetch_ahead(const Storage* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 2048);
}

template <class Tr>
RMK_TARGET inline void bracket_scalar(const typename Tr::Storage* x, int64_t i, int64_t n, uint32_t lo, uint32_t hi,
                                      uint32_t* c, BracketCounts& r) {
  const uint32_t span = hi - lo;  // key in [lo, hi]  <=>  key - lo <= span (unsigned)
  for (; i < n; ++i) {
    const uint32_t key = x[i] & Tr::kMagMask;
    r.below += key < lo;
    c[r.m] = key;  // branch-free: a store per element, a count per match
    r.m += (key - lo) <= span;
    r.max_key = key > r.max_key ? key : r.max_key;
  }
}

#if RMK_LEVEL == 1
// Keys are below 2^31 (sign cleared), so signed 32-bit compares order them correctly.
RMK_TARGET inline void bracket8(__m256i key, __m256i lo, __m256i hi, uint32_t* c, int64_t& m, __m256i& below,
                                __m256i& mx) {
  const __m256i lt = _mm256_cmpgt_epi32(lo, key);
  const __m256i out = _mm256_or_si256(lt, _mm256_cmpgt_epi32(key, hi));
  const unsigned in = ~unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(out))) & 0xffu;
  below = _mm256_sub_epi32(below, lt);  // lt is -1 per match
  mx = _mm256_max_epi32(mx, key);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompact8.idx[in]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + m), _mm256_permutevar8x32_epi32(key, idx));
  m += __builtin_popcount(in);
}
#elif RMK_LEVEL == 2
RMK_TARGET inline void bracket16(__m512i key, __m512i lo, __m512i span, uint32_t* c, int64_t& m, int64_t& below,
                                 __m512i& mx) {
  const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(key, lo), span);
  below += __builtin_popcount(unsigned(_mm512_cmplt_epu32_mask(key, lo)));
  mx = _mm512_max_epu32(mx, key);
  _mm512_storeu_si512(reinterpret_cast<void*>(c + m), _mm512_maskz_compress_epi32(in, key));
  m += __builtin_popcount(unsigned(in));
}
#endif

template <class Tr>
RMK_TARGET BracketCounts bracket(const void* xv, int64_t n, uint32_t lo, uint32_t hi, uint32_t* c) {
  const auto* x = static_cast<const typename Tr::Storage*>(xv);
  constexpr bool k16 = sizeof(typename Tr::Storage) == 2;
  BracketCounts r;
  int64_t i = 0;
#if RMK_LEVEL == 1
  const __m256i mag = _mm256_set1_epi32(int(Tr::kMagMask)), lov = _mm256_set1_epi32(int(lo)),
                hiv = _mm256_set1_epi32(int(hi));
  __m256i mx = _mm256_setzero_si256();
  // Per-lane int32 counts of keys below lo: flushed every 2^28 elements, far from overflow.
  for (int64_t chunk = 0; chunk < n; chunk += int64_t(1) << 28) {
    const int64_t end = std::min(n, chunk + (int64_t(1) << 28));
    __m256i below = _mm256_setzero_si256();
    for (; i + 16 <= end; i += 16) {
      prefetch_ahead(x + i);
      __m256i k0, k1;
      if constexpr (k16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
        k0 = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), mag);
        k1 = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), mag);
      } else {
        k0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), mag);
        k1 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8)), mag);
      }
      bracket8(k0, lov, hiv, c, r.m, below, mx);
      bracket8(k1, lov, hiv, c, r.m, below, mx);
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), below);
    for (int l = 0; l < 8; ++l) r.below += lanes[l];
  }
  alignas(32) uint32_t m8[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(m8), mx);
  for (int l = 0; l < 8; ++l) r.max_key = m8[l] > r.max_key ? m8[l] : r.max_key;
#elif RMK_LEVEL == 2
  const __m512i mag = _mm512_set1_epi32(int(Tr::kMagMask)), lov = _mm512_set1_epi32(int(lo)),
                span = _mm512_set1_epi32(int(hi - lo));
  __m512i mx = _mm512_setzero_si512();
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead(x + i);
    __m512i key;
    if constexpr (k16) {
      key = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    } else {
      key = _mm512_loadu_si512(reinterpret_cast<const void*>(x + i));
    }
    bracket16(_mm512_and_si512(key, mag), lov, span, c, r.m, r.below, mx);
  }
  r.max_key = _mm512_reduce_max_epu32(mx);
#else
  // Portable: the branch-free scalar loop (a branch on "any candidate in this group" costs
  // more in mispredictions than it saves), in groups of 16 for the prefetch.
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead(x + i);
    bracket_scalar<Tr>(x, i, i + 16, lo, hi, c, r);
  }
#endif
  (void)k16;
  bracket_scalar<Tr>(x, i, n, lo, hi, c, r);
  return r;
}

// ---------------------------------------------------------------- A: row sums and fusion

// keep ? v : +0.0 as a bit mask. The same value as the conditional, but with the float
// work done unconditionally, so compilers if-convert and vectorise the loops (a
// conditional multiply is not, under the default -ftrapping-math).
RMK_TARGET inline float masked(float v, bool keep) { return bits_to_f32(f32_to_bits(v) & (0u - uint32_t(keep))); }
RMK_TARGET inline double masked(double v, bool keep) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= 0ull - uint64_t(keep);
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// Elements [j, cols) of one row, scalar, continuing the 16 lanes (lane = j mod 16).
template <class Tr, bool kSums, bool kAcc>
RMK_TARGET inline void a_row_scalar(const typename Tr::Storage* row, int64_t j, int64_t cols, uint32_t tau, double* t,
                                    double* k, float* out) {
  for (; j < cols; ++j) {
    const auto s = row[j];
    const uint32_t key = s & Tr::kMagMask;
    const bool keep = key >= tau;
    if constexpr (kSums) {
      const double v = static_cast<double>(Tr::to_f32(static_cast<typename Tr::Storage>(key)));
      t[j & 15] += v;
      k[j & 15] += masked(v, keep);
    }
    if constexpr (kAcc) out[j] += masked(Tr::to_f32(s), keep);
  }
}

#if RMK_LEVEL == 1
// Eight elements: the signed values as floats, and their magnitude keys.
template <class Tr>
RMK_TARGET inline void load8(const typename Tr::Storage* x, __m256& v, __m256i& key) {
  const __m256i mag = _mm256_set1_epi32(int(Tr::kMagMask));
  if constexpr (sizeof(typename Tr::Storage) == 4) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    v = _mm256_castsi256_ps(raw);
    key = _mm256_and_si256(raw, mag);
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    const __m256i wide = _mm256_cvtepu16_epi32(raw);
    key = _mm256_and_si256(wide, mag);
    if constexpr (Tr::kNonFinite == 0x7c00u) {
      v = _mm256_cvtph_ps(raw);  // fp16 -> fp32 is exact (F16C)
    } else {
      v = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));  // bf16: the upper half of a float
    }
  }
}
#elif RMK_LEVEL == 2
template <class Tr>
RMK_TARGET inline void load16(const typename Tr::Storage* x, __m512& v, __m512i& key) {
  const __m512i mag = _mm512_set1_epi32(int(Tr::kMagMask));
  if constexpr (sizeof(typename Tr::Storage) == 4) {
    const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(x));
    v = _mm512_castsi512_ps(raw);
    key = _mm512_and_si512(raw, mag);
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m512i wide = _mm512_cvtepu16_epi32(raw);
    key = _mm512_and_si512(wide, mag);
    if constexpr (Tr::kNonFinite == 0x7c00u) {
      v = _mm512_cvtph_ps(raw);
    } else {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
  }
}
#endif

template <class Tr, bool kSums, bool kAcc>
RMK_TARGET void a_pass_t(const typename Tr::Storage* a, int64_t rows, int64_t cols, uint32_t tau, double* total,
                         double* kept, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const typename Tr::Storage* row = a + r * cols;
    float* out = kAcc ? acc + r * cols : nullptr;
    alignas(64) double t[16] = {}, k[16] = {};
    int64_t j = 0;
#if RMK_LEVEL == 1
    if constexpr (kSums) {
      // Lanes 0-3, 4-7, 8-11, 12-15 of the 16, for the total and the kept sums.
      __m256d T[4], K[4];
      for (int q = 0; q < 4; ++q) T[q] = K[q] = _mm256_setzero_pd();
      const __m256i tau1 = _mm256_set1_epi32(int(tau) - 1);  // key >= tau <=> key > tau - 1 (tau - 1 >= -1)
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      for (; j + 16 <= cols; j += 16) {
        for (int h = 0; h < 2; ++h) {
          __m256 v;
          __m256i key;
          load8<Tr>(row + j + 8 * h, v, key);
          const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, tau1));
          const __m256 mag = _mm256_and_ps(v, absmask);
          const __m256 kmag = _mm256_and_ps(mag, keep);  // +0 where dropped, as the scalar 0.0
          T[2 * h] = _mm256_add_pd(T[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(mag)));
          T[2 * h + 1] = _mm256_add_pd(T[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(mag, 1)));
          K[2 * h] = _mm256_add_pd(K[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(kmag)));
          K[2 * h + 1] = _mm256_add_pd(K[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(kmag, 1)));
          if constexpr (kAcc) {
            float* o = out + j + 8 * h;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_and_ps(v, keep)));
          }
        }
      }
      for (int q = 0; q < 4; ++q) {
        _mm256_store_pd(t + 4 * q, T[q]);
        _mm256_store_pd(k + 4 * q, K[q]);
      }
    }
#elif RMK_LEVEL == 0
    if constexpr (kSums) {
      // Blocks of 16 with the lane as the inner index: the shape the compiler vectorises
      // (SSE2 on x86-64, NEON on aarch64), in the same order as the scalar tail.
      for (; j + 16 <= cols; j += 16) {
        for (int l = 0; l < 16; ++l) {
          const auto s = row[j + l];
          const uint32_t key = s & Tr::kMagMask;
          const bool keep = key >= tau;
          const double v = static_cast<double>(Tr::to_f32(static_cast<typename Tr::Storage>(key)));
          t[l] += v;
          k[l] += masked(v, keep);
          if constexpr (kAcc) out[j + l] += masked(Tr::to_f32(s), keep);
        }
      }
    }
#elif RMK_LEVEL == 2
    if constexpr (kSums) {
      __m512d T0 = _mm512_setzero_pd(), T1 = T0, K0 = T0, K1 = T0;  // lanes 0-7 and 8-15
      const __m512i tauv = _mm512_set1_epi32(int(tau));
      const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
      for (; j + 16 <= cols; j += 16) {
        __m512 v;
        __m512i key;
        load16<Tr>(row + j, v, key);
        const __mmask16 keep = _mm512_cmpge_epu32_mask(key, tauv);
        const __m512 mag = _mm512_and_ps(v, absmask);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(mag));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(mag), 1)));
        T0 = _mm512_add_pd(T0, lo);
        T1 = _mm512_add_pd(T1, hi);
        // A masked add leaves a dropped lane as it is: the same as adding the scalar's +0.0.
        K0 = _mm512_mask_add_pd(K0, __mmask8(keep), K0, lo);
        K1 = _mm512_mask_add_pd(K1, __mmask8(keep >> 8), K1, hi);
        if constexpr (kAcc) {
          const __m512 o = _mm512_loadu_ps(out + j);
          _mm512_storeu_ps(out + j, _mm512_mask_add_ps(o, keep, o, v));
        }
      }
      _mm512_store_pd(t, T0);
      _mm512_store_pd(t + 8, T1);
      _mm512_store_pd(k, K0);
      _mm512_store_pd(k + 8, K1);
    }
#endif
    a_row_scalar<Tr, kSums, kAcc>(row, j, cols, tau, t, k, out);
    if constexpr (kSums) {
      total[r] = reduce16(t);
      kept[r] = reduce16(k);
    }
  }
}

// Masked accumulation alone (a fusion block of A): elementwise, so the compiler vectorises
// it for each path's ISA.
template <class Tr>
RMK_TARGET void a_acc(const typename Tr::Storage* x, int64_t len, uint32_t tau, float* acc) {
  for (int64_t j = 0; j < len; ++j) {
    const auto s = x[j];
    acc[j] += masked(Tr::to_f32(s), uint32_t(s & Tr::kMagMask) >= tau);
  }
}

template <class Tr>
RMK_TARGET void a_pass(const void* av, int64_t rows, int64_t cols, uint32_t tau, double* total, double* kept,
                       float* acc) {
  const auto* a = static_cast<const typename Tr::Storage*>(av);
  if (total && acc) {
    a_pass_t<Tr, true, true>(a, rows, cols, tau, total, kept, acc);
  } else if (total) {
    a_pass_t<Tr, true, false>(a, rows, cols, tau, total, kept, nullptr);
  } else if (acc) {
    a_acc<Tr>(a, rows * cols, tau, acc);
  }
}

// ---------------------------------------------------------------- B: weighted fusion

template <class Tr>
RMK_TARGET void b_pass(float* acc, const void* bv, int64_t rows, int64_t rank, uint32_t tau, float b_scale,
                       const float* w) {
  const auto* x = static_cast<const typename Tr::Storage*>(bv);
  for (int64_t i = 0; i < rows; ++i) {
    // The accumulator never overlaps the inputs: no run-time alias checks in short rows.
    const typename Tr::Storage* __restrict__ row = x + i * rank;
    float* __restrict__ out = acc + i * rank;
    int64_t c = 0;
#if RMK_LEVEL == 1
    const __m256i tau1 = _mm256_set1_epi32(int(tau) - 1);
    const __m256 bs = _mm256_set1_ps(b_scale);
    for (; c + 8 <= rank; c += 8) {
      __m256 v;
      __m256i key;
      load8<Tr>(row + c, v, key);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, tau1));
      const __m256 term = _mm256_mul_ps(_mm256_and_ps(_mm256_mul_ps(v, bs), keep), _mm256_loadu_ps(w + c));
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), term));
    }
#elif RMK_LEVEL == 2
    const __m512i tauv = _mm512_set1_epi32(int(tau));
    const __m512 bs = _mm512_set1_ps(b_scale);
    for (; c + 16 <= rank; c += 16) {
      __m512 v;
      __m512i key;
      load16<Tr>(row + c, v, key);
      const __mmask16 keep = _mm512_cmpge_epu32_mask(key, tauv);
      const __m512 term = _mm512_mul_ps(_mm512_maskz_mul_ps(keep, v, bs), _mm512_loadu_ps(w + c));
      _mm512_storeu_ps(out + c, _mm512_add_ps(_mm512_loadu_ps(out + c), term));
    }
#endif
    for (; c < rank; ++c) {
      const auto s = row[c];
      out[c] += masked(Tr::to_f32(s) * b_scale, uint32_t(s & Tr::kMagMask) >= tau) * w[c];
    }
  }
}

// ---------------------------------------------------------------- output

// Elementwise loops the compiler vectorises for each path's ISA; the conversions are
// integer bit manipulation (dtype.h), exact on every path.
RMK_TARGET bool store(void* out, int32_t dtype, const float* acc, int64_t len, float lam) {
  uint32_t overflow = 0;
  switch (dtype) {
    case kF32: {
      float* o = static_cast<float*>(out);
      for (int64_t j = 0; j < len; ++j) {
        const float v = lam * acc[j];
        o[j] = v;
        overflow |= (f32_to_bits(v) & 0x7f800000u) == 0x7f800000u;
      }
      break;
    }
    case kBF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = 0; j < len; ++j) {
        const uint16_t h = f32_to_bf16(lam * acc[j]);
        o[j] = h;
        overflow |= (h & 0x7f80u) == 0x7f80u;
      }
      break;
    }
    case kF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = 0; j < len; ++j) {
        const uint16_t h = f32_to_f16(lam * acc[j]);
        o[j] = h;
        overflow |= (h & 0x7c00u) == 0x7c00u;
      }
      break;
    }
    case kF64: {
      double* o = static_cast<double*>(out);
      for (int64_t j = 0; j < len; ++j) {
        const float v = lam * acc[j];
        o[j] = static_cast<double>(v);
        overflow |= (f32_to_bits(v) & 0x7f800000u) == 0x7f800000u;
      }
      break;
    }
  }
  return overflow == 0;
}

inline const Kernels& kernels() {
  static const Kernels k{
      RMK_NAME,
      {&bracket<F32>, &bracket<F16>, &bracket<BF16>},
      {&a_pass<F32>, &a_pass<F16>, &a_pass<BF16>},
      {&b_pass<F32>, &b_pass<F16>, &b_pass<BF16>},
      &store,
  };
  return k;
}

}  // namespace RMK_NS
}  // namespace robustmerge
