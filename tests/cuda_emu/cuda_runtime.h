// Host emulation of the CUDA subset the kernels of csrc/robustmerge/cuda/ use (select.cuh,
// fuse.cuh), so the whole merge runs unmodified on a machine without a GPU
// (tests/test_cuda_emulated.py: select_emu.cpp for the selection against a sort,
// merge_emu.cpp for every kernel against the CPU backend). Found before any real
// cuda_runtime.h by the include path (-I tests/cuda_emu).
//
// Execution model. Each CUDA thread of a block is a fiber on one OS thread; every round the
// runnable fibers run in a fresh random order (threads of a block interleave arbitrarily on
// real hardware) up to their next synchronisation point. __syncthreads(_or), the warp
// intrinsics (__match_any_sync, __ballot_sync, __shfl_sync, __shfl_xor_sync: full-warp
// masks only) rendezvous cooperatively; atomics yield first, so other threads interleave.
// Blocks of a launch run one after another in a shuffled order (emu::launch), each with its
// __shared__ variables filled with a fresh random byte (real shared memory starts with stale
// data). What the hardware would refuse or hang on stops the block and makes emu::launch
// throw emu::Fault (from the host stack, so a caller can report it): a barrier that some
// threads never reach (divergent __syncthreads, a non-uniform early return) as "deadlock",
// a load through __ldg / __ldcg not aligned to its type (16 bytes for uint4), a partial warp
// mask, a block of other than whole warps, and an access of a kernel thread that faults
// (SIGSEGV / SIGBUS while a kernel thread runs, as an illegal address ends a kernel).
//
// Arithmetic. __fadd_rn / __fmul_rn are the host's IEEE float add / multiply (round to
// nearest even); double and float code is the host's SSE arithmetic. Build with
// -ffp-contract=off (the real build passes nvcc --fmad=false: no a * b + c is fused),
// -fno-strict-aliasing (the kernels load and store through uint4 pointers) and no FTZ/DAZ
// (--ftz=false). The fixed-order reductions (warp_sum's xor tree, the warps-in-order sums)
// are the code's own loops, run as written, so their results are the device's.
//
// What it checks: indexing, grids, digit schedule, barrier and warp-intrinsic uniformity,
// missing barriers inside a block (the random thread order), shared memory read before the
// block wrote it (poisoned: shows in the results), alignment of vector loads, the arrival
// protocol's counting and publication, every value the kernels compute. What it cannot:
// memory ordering between blocks (fences, L1/L2 coherence), real concurrency of blocks
// (they never overlap here), out-of-bounds accesses that stay inside the process's memory
// (no bounds checks; a wild one crashes the process), timing, resource limits (registers,
// shared memory size), and device code generation (nvcc's own compile, checked by the real
// build).
#pragma once
#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__
#define __launch_bounds__(...)
#define __restrict__
// Function statics in one section, which emu::run_block poisons before every block. (The
// kernels' __shared__ variables are in non-template, non-inline __global__ functions; a
// COMDAT one would conflict with the section's flags at compile time, not silently.)
#define __shared__ static __attribute__((section("rmk_emu_shared")))
extern "C" char __start_rmk_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_rmk_emu_shared[] __attribute__((weak, visibility("hidden")));

struct alignas(16) uint4 { unsigned x, y, z, w; };  // CUDA's uint4 is 16-byte aligned
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct EmuDim3 { unsigned x = 0, y = 1, z = 1; };
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

// Context switches. On x86-64 a few instructions (callee-saved registers and the stack
// pointer): glibc's swapcontext makes a sigprocmask system call per switch, which made the
// emulation mostly kernel time. Shadow-stack builds (-fcf-protection with SHSTK) and other
// architectures keep ucontext.
#if defined(__x86_64__) && !(defined(__CET__) && (__CET__ & 2))
#define RMK_EMU_FAST_SWITCH 1
asm(".text\n"
    ".weak rmk_emu_switch\n"
    ".hidden rmk_emu_switch\n"
    ".type rmk_emu_switch,@function\n"
    "rmk_emu_switch:\n"  // rdi: where to save this stack pointer, rsi: the stack pointer to resume
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size rmk_emu_switch, .-rmk_emu_switch\n");
extern "C" void rmk_emu_switch(void** save_sp, void* resume_sp);
#else
#define RMK_EMU_FAST_SWITCH 0
#endif

namespace emu {
struct Context {
#if RMK_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};
inline void switch_to(Context& from, Context& to) {
#if RMK_EMU_FAST_SWITCH
  rmk_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}
// A context that starts fn() on [stack, stack + size); fn never returns.
inline void make_context(Context& c, char* stack, size_t size, void (*fn)()) {
#if RMK_EMU_FAST_SWITCH
  // Six zeroed registers, then fn as the return address: rmk_emu_switch's ret enters fn
  // with the stack as a call leaves it (rsp = 8 mod 16).
  void** top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15)) - 64);
  for (int i = 0; i < 8; ++i) top[i] = nullptr;
  top[6] = reinterpret_cast<void*>(fn);
  c.sp = top;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
#endif
}

struct Fiber {
  Context ctx;
  std::vector<char> stack;
  bool done = false;
  const long* wait_gen = nullptr;  // blocked while *wait_gen == wait_value (a barrier's generation)
  long wait_value = 0;
  bool warp_wait = false;
};
inline Context sched;
inline std::vector<Fiber> fibers;  // kept across blocks: stacks are allocated once
inline int cur = -1;
inline const std::function<void()>* body = nullptr;
inline std::mt19937_64 order_rng(1);  // thread order of every round; seeded by emu::launch
inline void yield() { switch_to(fibers[cur].ctx, sched); }

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};
inline std::string fault_what;  // set by fault(), thrown by run_block
inline char signal_what[96];    // set by on_bad_access (no allocation in a signal handler)
inline volatile sig_atomic_t in_kernel = 0;  // a kernel thread runs (not the scheduler)
inline struct sigaction old_segv, old_bus;
// The current thread did what the hardware refuses: its block stops here (the fibers are
// abandoned; kernels hold nothing that needs destroying) and run_block throws.
[[noreturn]] inline void fault(const std::string& what) {
  fault_what = what;
  switch_to(fibers[cur].ctx, sched);  // never resumed
  std::abort();
}
// SIGSEGV / SIGBUS: a kernel thread's bad access stops its block as fault() does (the
// handler never returns; SA_NODEFER leaves the signal unblocked). Outside a kernel thread
// the emulator itself is wrong: the previous handlers are put back and the access retried.
inline void on_bad_access(int sig, siginfo_t* info, void*) {
  if (!in_kernel) {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    return;
  }
  in_kernel = 0;
  std::snprintf(signal_what, sizeof signal_what, "emu: %s at address %p", sig == SIGBUS ? "bus error" : "invalid access",
                info->si_addr);
  switch_to(fibers[cur].ctx, sched);  // never resumed
}
struct BadAccessGuard {  // on_bad_access for the duration of a launch
  BadAccessGuard() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_bad_access;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
  }
  ~BadAccessGuard() {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
  }
  BadAccessGuard(const BadAccessGuard&) = delete;
  BadAccessGuard& operator=(const BadAccessGuard&) = delete;
};
inline void entry() {
  (*body)();
  fibers[cur].done = true;
  switch_to(fibers[cur].ctx, sched);  // never resumed
}
struct Barrier {
  int count = 0;
  long gen = 0;
  void wait(int n, bool warp) {
    if (++count == n) {  // the last arrival releases the others
      count = 0;
      ++gen;
      return;
    }
    Fiber& f = fibers[cur];
    f.wait_gen = &gen;
    f.wait_value = gen;
    f.warp_wait = warp;
    yield();  // the scheduler skips this fiber until gen moves on
    f.wait_gen = nullptr;
  }
};
inline Barrier block_bar, warp_bar[32];
inline uint64_t wslots[32][32];
inline int bslots[1024];

inline void run_block(unsigned block, unsigned nthreads, const std::function<void()>& f) {
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32)
    throw Fault("emu: block of " + std::to_string(nthreads) + " threads (1..1024, whole warps)");
  body = &f;
  blockIdx.x = block;
  blockDim.x = nthreads;
  if (__start_rmk_emu_shared && __stop_rmk_emu_shared)  // stale shared memory: a fresh byte per block
    std::memset(__start_rmk_emu_shared, int(order_rng() % 255) + 1, size_t(__stop_rmk_emu_shared - __start_rmk_emu_shared));
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  block_bar = Barrier{};
  for (auto& w : warp_bar) w = Barrier{};
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& fb = fibers[i];
    if (fb.stack.empty()) fb.stack.resize(1 << 16);
    fb.done = false;
    fb.wait_gen = nullptr;
    make_context(fb.ctx, fb.stack.data(), fb.stack.size(), entry);
  }
  std::vector<unsigned> order(nthreads);
  std::iota(order.begin(), order.end(), 0u);
  fault_what.clear();
  for (unsigned live = nthreads; live;) {
    std::shuffle(order.begin(), order.end(), order_rng);
    bool ran = false;
    for (unsigned i : order) {
      Fiber& fb = fibers[i];
      if (fb.done || (fb.wait_gen && *fb.wait_gen == fb.wait_value)) continue;
      ran = true;
      cur = int(i);
      threadIdx.x = i;
      in_kernel = 1;
      switch_to(sched, fb.ctx);
      in_kernel = 0;
      if (signal_what[0]) fault_what = signal_what, signal_what[0] = 0;
      if (!fault_what.empty())
        throw Fault(fault_what + " (block " + std::to_string(block) + ", thread " + std::to_string(i) + ")");
      live -= fb.done;
    }
    if (!ran) {
      unsigned done = 0, warp = 0;
      for (unsigned i = 0; i < nthreads; ++i) done += fibers[i].done, warp += !fibers[i].done && fibers[i].warp_wait;
      throw Fault("emu: deadlock in block " + std::to_string(block) + " (a barrier some threads never reach): " +
                  std::to_string(done) + " threads done, " + std::to_string(nthreads - done - warp) +
                  " waiting at __syncthreads, " + std::to_string(warp) + " at a warp intrinsic");
    }
  }
}

// One launch: `grid` blocks of `threads` threads, one after another in a random order (CUDA
// promises none), thread orders and shared-memory contents drawn from `seed`.
inline void launch(int64_t grid, unsigned threads, uint64_t seed, const std::function<void()>& kernel) {
  if (grid < 1 || grid > INT32_MAX) throw Fault("emu: grid of " + std::to_string(grid) + " blocks (1..2^31 - 1)");
  order_rng.seed(seed);
  std::vector<unsigned> order(static_cast<size_t>(grid));
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), order_rng);
  gridDim.x = unsigned(grid);
  const BadAccessGuard guard;
  for (unsigned b : order) run_block(b, threads, kernel);
}

// Every lane's v (all 32 lanes take part: full masks only, as the kernels use).
template <class T>
inline std::array<T, 32> warp_gather(unsigned mask, T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "32- and 64-bit values");
  if (mask != 0xffffffffu) fault("emu: partial warp mask");
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  std::memcpy(&wslots[w][l], &v, sizeof(T));
  warp_bar[w].wait(32, true);
  std::array<T, 32> a;
  for (int i = 0; i < 32; ++i) std::memcpy(&a[i], &wslots[w][i], sizeof(T));
  warp_bar[w].wait(32, true);  // nobody overwrites a slot before every lane has read them
  return a;
}
template <class T>
inline void check_aligned(const T* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T)) {
    char where[32];
    std::snprintf(where, sizeof where, "%p", static_cast<const void*>(p));
    fault("emu: misaligned " + std::to_string(sizeof(T)) + "-byte " + what + " at " + where);
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar.wait(int(blockDim.x), false); }
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
  const auto a = emu::warp_gather<uint32_t>(mask, p != 0);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= a[i] << i;
  return r;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) { return emu::warp_gather(mask, v)[src & 31]; }
// v of lane (lane ^ lane_mask), width 32 (the default and the kernels' use).
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::warp_gather(mask, v)[(int(threadIdx.x % 32) ^ lane_mask) & 31];
}
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Single OS thread: read-modify-write is atomic. Yield first, so other fibers interleave.
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) { emu::yield(); const uint32_t o = *p; *p = o + v; return o; }
inline int32_t atomicOr(int32_t* p, int32_t v) { emu::yield(); const int32_t o = *p; *p = o | v; return o; }
inline void __threadfence() {}
template <class T> inline T __ldg(const T* p) { emu::check_aligned(p, "__ldg"); return *p; }
template <class T> inline T __ldcg(const T* p) { emu::check_aligned(p, "__ldcg"); return *p; }
// IEEE single precision, round to nearest even, never fused (see the top of this file).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
