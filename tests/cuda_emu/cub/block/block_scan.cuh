// cub::BlockScan::ExclusiveSum for the host emulation (tests/cuda_emu/cuda_runtime.h).
#pragma once
namespace cub {
template <class T, int N>
struct BlockScan {
  struct TempStorage { T v[N]; };
  TempStorage& s;
  explicit BlockScan(TempStorage& t) : s(t) {}
  void ExclusiveSum(T in, T& out) {
    s.v[threadIdx.x] = in;
    __syncthreads();
    T acc = 0;
    for (unsigned i = 0; i < threadIdx.x; ++i) acc += s.v[i];
    out = acc;
    __syncthreads();
  }
};
}  // namespace cub
