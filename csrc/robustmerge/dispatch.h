// Run-time choice of the SIMD code path: one build serves every CPU.
//
// simd_kernels.h is compiled three times into this one translation unit, each copy in its
// own namespace with a GCC/Clang target attribute on every function (portable: the build's
// baseline ISA, x86-64 unless RMK_NATIVE; avx2: AVX2 + F16C; avx512: AVX-512 F/BW/VL/DQ).
// At import the best path the CPU supports is chosen with __builtin_cpu_supports (which
// also checks that the OS saves the vector registers); set_path() forces another one.
//
// Why target attributes and not Google Highway: the kernels are four small loops, three
// of them need a compress/shuffle that is hand-written anyway, and this keeps the module
// free of a dependency (no submodule, no vendored copy in the sdist). Why not separate
// translation units with -mavx2: inline functions and std:: templates compiled in such a
// unit are merged by the linker with the baseline copies, so an AVX2 build of, e.g.,
// std::nth_element could end up called on a CPU without AVX2. Attributes apply only to
// the functions below; everything else is compiled once, for the baseline.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype.h"
#include "kernel_table.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RMK_X86_DISPATCH 1
// GCC 12 reports false -W(maybe-)uninitialized warnings inside its own AVX-512 intrinsics
// when they are used from target-attribute functions (the "undefined" vectors they pass as
// merge sources); the diagnostics point into these headers, so they are silenced here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <cpuid.h>
#endif

#define RMK_NS portable
#define RMK_NAME "portable"
#define RMK_TARGET
#define RMK_LEVEL 0
#include "simd_kernels.h"
#undef RMK_NS
#undef RMK_NAME
#undef RMK_TARGET
#undef RMK_LEVEL

#if RMK_X86_DISPATCH
#define RMK_NS avx2
#define RMK_NAME "avx2"
#define RMK_TARGET __attribute__((target("avx2,f16c,popcnt,bmi,bmi2")))
#define RMK_LEVEL 1
#include "simd_kernels.h"
#undef RMK_NS
#undef RMK_NAME
#undef RMK_TARGET
#undef RMK_LEVEL

#define RMK_NS avx512
#define RMK_NAME "avx512"
#define RMK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt,bmi,bmi2")))
#define RMK_LEVEL 2
#include "simd_kernels.h"
#undef RMK_NS
#undef RMK_NAME
#undef RMK_TARGET
#undef RMK_LEVEL
#endif

namespace robustmerge {

#if RMK_X86_DISPATCH
// F16C (CPUID leaf 1, ECX bit 29) read directly: clang < 16 has no "f16c" for
// __builtin_cpu_supports. Its registers are the AVX ones, whose OS support the "avx2" check
// beside it covers.
inline bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
}
#endif

// Every path compiled into this build, best first, and whether this CPU can run it.
struct SimdPath {
  const Kernels* kernels;
  bool supported;
};

inline std::vector<SimdPath> simd_paths() {
  std::vector<SimdPath> paths;
#if RMK_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && cpu_has_f16c() && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  paths.push_back({&avx512::kernels(), avx512});
  paths.push_back({&avx2::kernels(), avx2});
#endif
  paths.push_back({&portable::kernels(), true});
  return paths;
}

inline std::atomic<const Kernels*>& active_slot() {
  static std::atomic<const Kernels*> slot{[] {
    for (const SimdPath& p : simd_paths())
      if (p.supported) return p.kernels;
    return &portable::kernels();
  }()};
  return slot;
}

// The path merges use; read once per call, so a concurrent set_path() never mixes paths
// within one merge.
inline const Kernels& active_kernels() { return *active_slot().load(std::memory_order_acquire); }

// "auto" (the best supported path) or a path by name; a path this build lacks or this CPU
// cannot run is refused with std::invalid_argument saying which.
inline void set_path(const std::string& name) {
  std::string known;
  for (const SimdPath& p : simd_paths()) {
    if (name == "auto" ? p.supported : name == p.kernels->name) {
      if (!p.supported)
        throw std::invalid_argument("SIMD path '" + name + "' is compiled in but this CPU does not support it");
      active_slot().store(p.kernels, std::memory_order_release);
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(p.kernels->name);
  }
  throw std::invalid_argument("unknown SIMD path '" + name + "' (this build has: auto, " + known + ")");
}

}  // namespace robustmerge
