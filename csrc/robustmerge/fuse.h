// Cross-task fusion (SPEC step 4) over one block of a module's output:
//   A*[j]    = lam * sum_t [key(A_t[j]) >= tau_t] A_t[j]
//   B*[i, c] = lam * sum_t w_t[c] * [key(B_t[i, c]) >= tau_t] (b_scale_t * B_t[i, c])
// with w_t = s_t / sum_t s_t. Accumulation is float32 in a block buffer, adapters in plan
// order, the same order of operations as the reference; the block is then converted to
// the output dtype.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace robustmerge {

template <class Tr>
void accumulate_masked(float* acc, const typename Tr::Storage* x, int64_t len, uint32_t tau) {
  for (int64_t j = 0; j < len; ++j) {
    const auto s = x[j];
    const float v = Tr::to_f32(s);
    acc[j] += (uint32_t(s & Tr::kMagMask) >= tau) ? v : 0.0f;
  }
}

// x: `rows` rows of `rank` columns (a row block of B); w: the rank column weights.
template <class Tr>
void accumulate_masked_weighted(float* acc, const typename Tr::Storage* x, int64_t rows, int64_t rank, uint32_t tau,
                                float b_scale, const float* w) {
  for (int64_t i = 0; i < rows; ++i) {
    const typename Tr::Storage* row = x + i * rank;
    float* out = acc + i * rank;
    for (int64_t c = 0; c < rank; ++c) {
      const auto s = row[c];
      const float v = (uint32_t(s & Tr::kMagMask) >= tau) ? Tr::to_f32(s) * b_scale : 0.0f;
      out[c] += v * w[c];
    }
  }
}

// out[j] = lam * acc[j] in the output dtype. Returns false when some stored value is inf
// (finite inputs whose merge overflows the output dtype, e.g. fp16 above 65504), so the
// caller can refuse the adapter without scanning the output again.
inline bool store_scaled(void* out, int32_t dtype, const float* acc, int64_t len, float lam) {
  uint32_t overflow = 0;
  switch (dtype) {
    case kF32: {
      float* o = static_cast<float*>(out);
      for (int64_t j = 0; j < len; ++j) {
        o[j] = lam * acc[j];
        overflow |= (f32_to_bits(o[j]) & 0x7f800000u) == 0x7f800000u;
      }
      break;
    }
    case kBF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = 0; j < len; ++j) {
        o[j] = f32_to_bf16(lam * acc[j]);
        overflow |= (o[j] & 0x7f80u) == 0x7f80u;
      }
      break;
    }
    case kF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = 0; j < len; ++j) {
        o[j] = f32_to_f16(lam * acc[j]);
        overflow |= (o[j] & 0x7c00u) == 0x7c00u;
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

}  // namespace robustmerge
