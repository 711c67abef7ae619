// Host emulation of the CUDA subset that csrc/robustmerge/cuda/select.cuh uses, so its
// kernel runs unmodified on a machine without a GPU (tests/test_cuda_emulated.py). Found
// before any real cuda_runtime.h by the include path (-I tests/cuda_emu).
//
// Each CUDA thread of a block is a ucontext fiber on one OS thread, scheduled round robin;
// __syncthreads and the warp intrinsics (__match_any_sync, __ballot_sync, __shfl_sync)
// rendezvous cooperatively; atomics yield first so threads interleave. Blocks run one after
// another (the caller picks the order). A barrier that some threads never reach (divergent
// __syncthreads, a non-uniform early return) aborts with "deadlock" instead of hanging.
// What it checks: indexing, digit schedule, barrier uniformity, the arrival protocol's
// counting and publication. What it cannot: memory ordering between blocks (fences, L1/L2
// coherence), real concurrency of blocks, timing.
#pragma once
#include <ucontext.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct EmuDim3 { unsigned x = 0, y = 1, z = 1; };
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  const void* waiting = nullptr;
};
inline ucontext_t sched;
inline std::vector<Fiber> fibers;
inline int cur = -1;
inline long progress = 0;
inline std::function<void()> body;
inline void yield() { swapcontext(&fibers[cur].ctx, &sched); }
inline void entry() {
  body();
  fibers[cur].done = true;
  ++progress;
  swapcontext(&fibers[cur].ctx, &sched);
}
struct Barrier {
  int count = 0;
  long gen = 0;
  void wait(int n) {
    const long g = gen;
    ++progress;
    if (++count == n) {
      count = 0;
      ++gen;
    } else {
      fibers[cur].waiting = this;
      while (gen == g) yield();
      fibers[cur].waiting = nullptr;
    }
  }
};
inline Barrier block_bar, warp_bar[32];
inline uint32_t wslots[32][32];
inline int bslots[1024];
inline void run_block(unsigned block, unsigned nthreads, const std::function<void()>& f) {
  body = f;
  blockIdx.x = block;
  blockDim.x = nthreads;
  fibers.clear();
  fibers.resize(nthreads);
  block_bar = Barrier{};
  for (auto& w : warp_bar) w = Barrier{};
  for (unsigned i = 0; i < nthreads; ++i) {
    auto& fb = fibers[i];
    fb.stack.resize(1 << 16);
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = fb.stack.data();
    fb.ctx.uc_stack.ss_size = fb.stack.size();
    fb.ctx.uc_link = nullptr;
    makecontext(&fb.ctx, entry, 0);
  }
  for (;;) {
    const long before = progress;
    bool alive = false;
    for (unsigned i = 0; i < nthreads; ++i) {
      if (fibers[i].done) continue;
      alive = true;
      cur = int(i);
      threadIdx.x = i;
      swapcontext(&sched, &fibers[i].ctx);
    }
    if (!alive) return;
    if (progress == before) {
      std::fprintf(stderr, "emu: deadlock in block %u (a barrier some threads never reach)\n", block);
      for (unsigned i = 0; i < nthreads; ++i)
        if (i < 40 || i % 32 == 0)
          std::fprintf(stderr, "  thread %u: %s%s\n", i, fibers[i].done ? "done" : "waiting",
                       fibers[i].waiting == &block_bar ? " block barrier" : fibers[i].waiting ? " warp barrier" : "");
      std::abort();
    }
  }
}
inline std::array<uint32_t, 32> warp_gather(unsigned mask, uint32_t v) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial warp mask\n"); std::abort(); }
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  wslots[w][l] = v;
  warp_bar[w].wait(32);
  std::array<uint32_t, 32> a;
  std::memcpy(a.data(), wslots[w], sizeof(a));
  warp_bar[w].wait(32);
  return a;
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar.wait(int(blockDim.x)); }
inline int __syncthreads_or(int p) {
  emu::bslots[threadIdx.x] = p;
  __syncthreads();
  int r = 0;
  for (unsigned i = 0; i < blockDim.x; ++i) r |= emu::bslots[i] != 0;
  __syncthreads();
  return r;
}
inline unsigned __match_any_sync(unsigned mask, uint32_t v) {
  const auto a = emu::warp_gather(mask, v);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= (a[i] == v ? 1u : 0u) << i;
  return r;
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  const auto a = emu::warp_gather(mask, p != 0);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= a[i] << i;
  return r;
}
inline uint32_t __shfl_sync(unsigned mask, uint32_t v, int src) { return emu::warp_gather(mask, v)[src]; }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Single OS thread: read-modify-write is atomic. Yield first, so other fibers interleave.
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) { ++emu::progress; emu::yield(); const uint32_t o = *p; *p = o + v; return o; }
inline int32_t atomicOr(int32_t* p, int32_t v) { ++emu::progress; emu::yield(); const int32_t o = *p; *p = o | v; return o; }
inline void __threadfence() {}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
