// docs/ALGORITHM.md §3 steps 2-4 on the GPU, after select.cuh has the thresholds:
//
//   fuse_a_kernel   one block per A* tile (a segment of <= kTile elements of one row of A*):
//                   A* = lam * sum_t [|A_t| >= tau_t] A_t, adapters in plan order, and in
//                   the same pass the tile's sums of |A_t| and kept |A_t| per adapter
//                   (double), written as per (row, segment) partials. So the row sums cost
//                   no read of A of their own.
//   weights_kernel  one block per module: A-row scales s = total / kept (1 where nothing is
//                   kept) from the partials summed in segment order, the per-task clamp
//                   (lo = the clamp_index-th smallest s), and the normalised weights
//                   w_t[c] = s_t[c] / sum_t s_t[c] (double, then float), adapters in order.
//   fuse_b_kernel   one block per B* tile of kTile elements:
//                   B* = lam * sum_t ([|B_t| >= tau_t] B_t * b_scale_t) * w_t[col].
//
// Each thread owns kElemsPerThread = 8 consecutive elements. The adapters' pointers,
// thresholds and dtypes (and for B the weights) of a chunk of kStage adapters are staged in
// shared memory, then all kStage loads (16-byte vectors where aligned) are issued before
// the chunk is summed, so an element waits for about T / kStage DRAM latencies, not T.
// The sum itself is the CPU kernel's: float32, plan order, __fadd_rn / __fmul_rn (and the
// build uses -fmad=false), stored with round-to-nearest-even: A* is bit-identical to the
// CPU backend's, B* as far as the double row sums allow (another summation order).
#pragma once

#include "device_plan.cuh"

namespace robustmerge {
namespace cuda {

// out[j + e] = lam * acc[e] for e < n_valid in the output dtype (the CPU's simd_kernels.h stores);
// true when a stored value is inf. 16-byte vector stores where aligned.
__device__ __forceinline__ bool is_inf_bits(int64_t od, uint32_t bits) {
  if (od == kBF16) return (bits & 0x7f80u) == 0x7f80u;
  if (od == kF16) return (bits & 0x7c00u) == 0x7c00u;
  return (bits & 0x7f800000u) == 0x7f800000u;  // float32, and float64 stored from a float
}

__device__ __forceinline__ bool store8(void* out, int64_t od, int64_t j, int n_valid, float lam, const float* acc) {
  uint32_t bits[8];
  bool overflow = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float v = __fmul_rn(lam, acc[e]);
    bits[e] = od == kBF16 ? f32_to_bf16(v) : od == kF16 ? f32_to_f16(v) : f32_to_bits(v);
    overflow |= e < n_valid && is_inf_bits(od, bits[e]);
  }
  // Scalar stores below are unrolled with a guard, not a loop to n_valid: bits[] must stay
  // in registers (a dynamic index would put it on the stack).
  if (od == kF64) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < n_valid) static_cast<double*>(out)[j + e] = static_cast<double>(bits_to_f32(bits[e]));
    return overflow;
  }
  const bool wide = od == kF32;
  char* dst = static_cast<char*>(out) + j * (wide ? 4 : 2);
  if (n_valid == 8 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    if (wide) {
      reinterpret_cast<uint4*>(dst)[0] = make_uint4(bits[0], bits[1], bits[2], bits[3]);
      reinterpret_cast<uint4*>(dst)[1] = make_uint4(bits[4], bits[5], bits[6], bits[7]);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16),
                                                  bits[4] | (bits[5] << 16), bits[6] | (bits[7] << 16));
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e >= n_valid) continue;
      if (wide) reinterpret_cast<uint32_t*>(dst)[e] = bits[e];
      else reinterpret_cast<uint16_t*>(dst)[e] = static_cast<uint16_t>(bits[e]);
    }
  }
  return overflow;
}

__device__ __forceinline__ Raw8 load8_any(int32_t dtype, const void* base, int64_t j, int n_valid) {
  switch (dtype) {
    case kF32: return load8<F32>(base, j, n_valid);
    case kF16: return load8<F16>(base, j, n_valid);
    default: return load8<BF16>(base, j, n_valid);
  }
}

// acc[e] += [key >= tau] x (as the CPU's simd_kernels.h), plus this thread's sums of |x| and
// of kept |x| in double, elements in order.
template <class Tr>
__device__ __forceinline__ void add_a(const Raw8& raw, int n_valid, uint32_t tau, float* acc, double& total,
                                      double& kept) {
  using S = typename Tr::Storage;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < n_valid) {
      const S s = raw_at<Tr>(raw, e);
      const uint32_t key = uint32_t(s) & Tr::kMagMask;
      const bool keep = key >= tau;
      acc[e] = __fadd_rn(acc[e], keep ? Tr::to_f32(s) : 0.0f);
      const double mag = static_cast<double>(Tr::to_f32(static_cast<S>(key)));
      total += mag;
      kept += keep ? mag : 0.0;
    }
  }
}

// acc[e] += ([key >= tau] x * b_scale) * w[col]  (as the CPU's simd_kernels.h)
template <class Tr>
__device__ __forceinline__ void add_b(const Raw8& raw, int n_valid, uint32_t tau, float bs, const float* w,
                                      int32_t col, int32_t r, float* acc) {
  using S = typename Tr::Storage;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < n_valid) {
      const S s = raw_at<Tr>(raw, e);
      const float v = (uint32_t(s) & Tr::kMagMask) >= tau ? __fmul_rn(Tr::to_f32(s), bs) : 0.0f;
      acc[e] = __fadd_rn(acc[e], __fmul_rn(v, w[col]));
    }
    col = col + 1 == r ? 0 : col + 1;
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);  // fixed tree: deterministic
  return v;
}

struct Stage {
  const void* ptr[kStage];
  uint32_t tau[kStage];
  int32_t dtype[kStage];
  float b_scale[kStage];
};

__global__ void __launch_bounds__(kFuseThreads) fuse_a_kernel(DevicePlan p) {
  if (*p.any_bad) return;
  constexpr int kWarps = kFuseThreads / 32;
  __shared__ Stage st;
  __shared__ double sums[kStage][kWarps][2];
  const int64_t m = tile_module(p.tile_first_a, p.n_modules, blockIdx.x);
  const int64_t* md = p.modules + m * kModCols;
  const int64_t first = md[kModFirst], last = first + md[kModMembers], in = md[kModIn];
  const int64_t n_seg = segments_per_row(in);
  const int64_t local = int64_t(blockIdx.x) - p.tile_first_a[m];
  const int64_t row = local / n_seg, seg = local % n_seg;
  const int64_t start = row * in + seg * kTile;
  const int64_t len = in - seg * kTile < kTile ? in - seg * kTile : kTile;
  const int64_t off = int64_t(threadIdx.x) * kElemsPerThread;
  const int n_valid = off < len ? int(len - off < 8 ? len - off : 8) : 0;
  const int64_t j = start + off;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c0 = first; c0 < last; c0 += kStage) {
    const int cn = int(last - c0 < kStage ? last - c0 : kStage);
    if (threadIdx.x < cn) {
      const int64_t* it = p.items + (c0 + threadIdx.x) * kItemCols;
      st.ptr[threadIdx.x] = reinterpret_cast<const void*>(it[kItemA]);
      st.dtype[threadIdx.x] = int32_t(it[kItemADtype]);
      st.tau[threadIdx.x] = p.tau[2 * (c0 + threadIdx.x)];
    }
    __syncthreads();
    Raw8 raw[kStage];
#pragma unroll
    for (int q = 0; q < kStage; ++q)  // every load of the chunk in flight before any add
      if (q < cn && n_valid > 0) raw[q] = load8_any(st.dtype[q], st.ptr[q], j, n_valid);
#pragma unroll
    for (int q = 0; q < kStage; ++q) {
      if (q < cn) {  // block-uniform
        double total = 0.0, kept = 0.0;
        switch (st.dtype[q]) {
          case kF32: add_a<F32>(raw[q], n_valid, st.tau[q], acc, total, kept); break;
          case kF16: add_a<F16>(raw[q], n_valid, st.tau[q], acc, total, kept); break;
          default: add_a<BF16>(raw[q], n_valid, st.tau[q], acc, total, kept); break;
        }
        total = warp_sum(total);
        kept = warp_sum(kept);
        if (lane == 0) sums[q][warp][0] = total, sums[q][warp][1] = kept;
      }
    }
    __syncthreads();
    if (threadIdx.x < cn) {  // the tile's partial of (item, row): warps in order
      double total = 0.0, kept = 0.0;
      for (int w = 0; w < kWarps; ++w) total += sums[threadIdx.x][w][0], kept += sums[threadIdx.x][w][1];
      double* part = p.partials + 2 * (p.part_offset[c0 + threadIdx.x] + row * n_seg + seg);
      part[0] = total;
      part[1] = kept;
    }
    __syncthreads();  // st and sums are rewritten by the next chunk
  }
  const bool overflow = n_valid > 0 && store8(reinterpret_cast<void*>(md[kModOutA]), md[kModOutDtype], j, n_valid,
                                              p.lam, acc);
  if (__syncthreads_or(overflow) && threadIdx.x == 0) atomicOr(p.overflow + m, 1);
}

__global__ void __launch_bounds__(kWeightThreads) weights_kernel(DevicePlan p) {
  if (*p.any_bad) return;
  const int64_t* md = p.modules + int64_t(blockIdx.x) * kModCols;
  const int64_t r = md[kModRank], first = md[kModFirst], members = md[kModMembers];
  const int64_t n_seg = segments_per_row(md[kModIn]), clamp_index = md[kModClampIndex];
  // Raw scales: s = total / kept over the row's segments in order; 1 where nothing is kept.
  for (int64_t x = threadIdx.x; x < members * r; x += blockDim.x) {
    const int64_t i = first + x / r, row = x % r;
    const double* part = p.partials + 2 * (p.part_offset[i] + row * n_seg);
    double total = 0.0, kept = 0.0;
    for (int64_t s = 0; s < n_seg; ++s) total += part[2 * s], kept += part[2 * s + 1];
    p.scales[p.scale_offset[i] + row] = kept > 0.0 ? total / kept : 1.0;
  }
  __syncthreads();  // the block's global writes are visible to the whole block
  // Per task: lo = the row whose rank in (value, row index) order is clamp_index (exactly
  // one per task), then s = max(s, lo).
  for (int64_t x = threadIdx.x; x < members * r; x += blockDim.x) {
    const int64_t i = first + x / r, row = x % r;
    const double* s = p.scales + p.scale_offset[i];
    const double v = s[row];
    int64_t before = 0;
    for (int64_t q = 0; q < r; ++q) before += (s[q] < v) || (s[q] == v && q < row);
    if (before == clamp_index) p.lo[i] = v;
  }
  __syncthreads();
  for (int64_t x = threadIdx.x; x < members * r; x += blockDim.x) {
    const int64_t i = first + x / r, row = x % r;
    const double lo = p.lo[i];
    double& s = p.scales[p.scale_offset[i] + row];
    s = s < lo ? lo : s;  // std::max(s, lo)
  }
  __syncthreads();
  // w_t[c] = s_t[c] / sum_t s_t[c], adapters in plan order (as CpuMerge::fusion_weights).
  for (int64_t c = threadIdx.x; c < r; c += blockDim.x) {
    double sum = 0.0;
    for (int64_t t = 0; t < members; ++t) sum += p.scales[p.scale_offset[first + t] + c];
    for (int64_t t = 0; t < members; ++t) {
      const int64_t at = p.scale_offset[first + t] + c;
      p.weights[at] = static_cast<float>(p.scales[at] / sum);
    }
  }
}

__global__ void __launch_bounds__(kFuseThreads) fuse_b_kernel(DevicePlan p) {
  if (*p.any_bad) return;
  __shared__ Stage st;
  __shared__ float w_stage[kStage][kStagedRank];
  const int64_t m = tile_module(p.tile_first_b, p.n_modules, blockIdx.x);
  const int64_t* md = p.modules + m * kModCols;
  const int32_t r = int32_t(md[kModRank]);
  const int64_t numel = int64_t(r) * md[kModOut];
  const int64_t start = (int64_t(blockIdx.x) - p.tile_first_b[m]) * kTile;
  const int64_t len = numel - start < kTile ? numel - start : kTile;
  const bool staged_w = r <= kStagedRank;
  const int64_t first = md[kModFirst], last = first + md[kModMembers];
  const int64_t off = int64_t(threadIdx.x) * kElemsPerThread;
  const int n_valid = off < len ? int(len - off < 8 ? len - off : 8) : 0;
  const int64_t j = start + off;  // element of B* [out, r], row-major
  const int32_t col = int32_t(j % r);
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c0 = first; c0 < last; c0 += kStage) {
    const int cn = int(last - c0 < kStage ? last - c0 : kStage);
    if (threadIdx.x < cn) {
      const int64_t* it = p.items + (c0 + threadIdx.x) * kItemCols;
      st.ptr[threadIdx.x] = reinterpret_cast<const void*>(it[kItemB]);
      st.dtype[threadIdx.x] = int32_t(it[kItemBDtype]);
      st.tau[threadIdx.x] = p.tau[2 * (c0 + threadIdx.x) + 1];
      st.b_scale[threadIdx.x] = static_cast<float>(p.b_scale[c0 + threadIdx.x]);
    }
    if (staged_w)
      for (int x = threadIdx.x; x < cn * r; x += blockDim.x)
        w_stage[x / r][x % r] = p.weights[p.scale_offset[c0 + x / r] + x % r];
    __syncthreads();
    Raw8 raw[kStage];
#pragma unroll
    for (int q = 0; q < kStage; ++q)
      if (q < cn && n_valid > 0) raw[q] = load8_any(st.dtype[q], st.ptr[q], j, n_valid);
#pragma unroll
    for (int q = 0; q < kStage; ++q) {
      if (q < cn) {
        const float* w = staged_w ? w_stage[q] : p.weights + p.scale_offset[c0 + q];
        switch (st.dtype[q]) {
          case kF32: add_b<F32>(raw[q], n_valid, st.tau[q], st.b_scale[q], w, col, r, acc); break;
          case kF16: add_b<F16>(raw[q], n_valid, st.tau[q], st.b_scale[q], w, col, r, acc); break;
          default: add_b<BF16>(raw[q], n_valid, st.tau[q], st.b_scale[q], w, col, r, acc); break;
        }
      }
    }
    __syncthreads();  // st and w_stage are rewritten by the next chunk
  }
  const bool overflow = n_valid > 0 && store8(reinterpret_cast<void*>(md[kModOutB]), md[kModOutDtype], j, n_valid,
                                              p.lam, acc);
  if (__syncthreads_or(overflow) && threadIdx.x == 0) atomicOr(p.overflow + m, 2);
}

}  // namespace cuda
}  // namespace robustmerge
