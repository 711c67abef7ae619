// Element types the kernels read and write, and exact conversions between them.
//
// Masks are decided on "magnitude keys": the stored bits with the sign cleared. For IEEE
// formats, ordering non-negative finite values is the same as ordering these keys as
// unsigned integers, so thresholds and masks never touch floating-point arithmetic and
// are identical on every backend. All conversions here are integer bit manipulation or
// exact float operations on normal numbers, so they do not depend on the FTZ/DAZ state.
#pragma once

#include <cstdint>
#include <cstring>

// RMK_HD marks the conversions usable from CUDA device code as well (csrc/robustmerge/cuda/).
// Outside nvcc it is plain `inline`, so the CPU build is unchanged.
#if defined(__CUDACC__)
#define RMK_HD __host__ __device__ __forceinline__
#else
#define RMK_HD inline
#endif

namespace robustmerge {

// Codes shared with the Python layer (robustmerge_kernels/backends/cpu.py).
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

RMK_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RMK_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// fp16 -> fp32, exact for every finite half (inputs are checked finite before use).
// Normal halves: re-bias the exponent (127 - 15 = 112). Subnormal halves are m * 2^-24,
// computed from the integer m so no subnormal float is ever formed.
RMK_HD float f16_to_f32(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const float normal = bits_to_f32((em << 13) + (112u << 23));
  const float subnormal = static_cast<float>(em) * 0x1p-24f;
  const float mag = em < 0x400u ? subnormal : normal;
  return bits_to_f32(f32_to_bits(mag) | (uint32_t(h & 0x8000u) << 16));
}

RMK_HD float bf16_to_f32(uint16_t b) { return bits_to_f32(uint32_t(b) << 16); }

// fp32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16)); values past the
// largest bf16 round to inf, which the Python layer refuses. NaN never reaches here.
RMK_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> fp16, round to nearest even, subnormal halves and overflow to inf included.
RMK_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  // Normal half range: re-bias the exponent, then round the 23-bit mantissa to 10 bits;
  // a carry out of the mantissa correctly bumps the exponent (up to inf = 0x7c00).
  const uint32_t rebias = au - (112u << 23);
  const uint32_t normal = (rebias + 0xfffu + ((rebias >> 13) & 1u)) >> 13;
  // Below 2^-14 the half is subnormal: round |f| / 2^-24 to an integer (ties to even)
  // with the 2^23 trick; |f| * 2^24 < 1024 is exact. 1024 itself is the smallest normal.
  const float scaled = bits_to_f32(au) * 0x1p24f;
  const uint32_t subnormal = static_cast<uint32_t>((scaled + 0x1p23f) - 0x1p23f);
  uint32_t h = au < (113u << 23) ? subnormal : normal;
  h = au >= 0x47800000u ? 0x7c00u : h;  // >= 65536: inf (rounding covers [65520, 65536))
  return static_cast<uint16_t>(sign | h);
}

// Per-format facts the selection and fusion kernels are templated on.
struct F32 {
  using Storage = uint32_t;
  static constexpr int kShift = 20;                   // top 11 of the 31 magnitude bits
  static constexpr uint32_t kMagMask = 0x7fffffffu;
  static constexpr uint32_t kNonFinite = 0x7f800000u;  // exponent all ones: inf / NaN
  RMK_HD static float to_f32(Storage s) { return bits_to_f32(s); }
};

struct BF16 {
  using Storage = uint16_t;
  static constexpr int kShift = 4;  // top 11 of the 15 magnitude bits
  static constexpr uint32_t kMagMask = 0x7fffu;
  static constexpr uint32_t kNonFinite = 0x7f80u;
  RMK_HD static float to_f32(Storage s) { return bf16_to_f32(s); }
};

struct F16 {
  using Storage = uint16_t;
  static constexpr int kShift = 4;
  static constexpr uint32_t kMagMask = 0x7fffu;
  static constexpr uint32_t kNonFinite = 0x7c00u;
  RMK_HD static float to_f32(Storage s) { return f16_to_f32(s); }
};

// Calls f(Traits{}) for a runtime dtype code; returns false for codes it does not know.
template <class F>
bool dispatch_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case kF32: f(F32{}); return true;
    case kF16: f(F16{}); return true;
    case kBF16: f(BF16{}); return true;
    default: return false;
  }
}

}  // namespace robustmerge
