// A minimal fork-join parallel loop: tasks are taken from a shared counter, so the work
// a thread does never changes a task's result; results are bit-identical whatever the
// thread count. Worker threads run with FTZ/DAZ cleared so subnormal inputs are exact
// even if the calling process flushed denormals (torch.set_flush_denormal).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define ROBUSTMERGE_HAS_MXCSR 1
#endif

namespace robustmerge {

class ExactFloatScope {  // clears flush-to-zero / denormals-are-zero for its lifetime
 public:
  ExactFloatScope() {
#ifdef ROBUSTMERGE_HAS_MXCSR
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~0x8040u);  // bit 15 FTZ, bit 6 DAZ
#endif
  }
  ~ExactFloatScope() {
#ifdef ROBUSTMERGE_HAS_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  ExactFloatScope(const ExactFloatScope&) = delete;
  ExactFloatScope& operator=(const ExactFloatScope&) = delete;

 private:
  unsigned saved_ = 0;
};

template <class F>
void parallel_for(int64_t n_tasks, int n_threads, F&& task) {
  if (n_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    ExactFloatScope exact;
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) task(i);
  };
  const int64_t spawn = std::min<int64_t>(n_threads, n_tasks) - 1;
  std::vector<std::thread> threads;
  threads.reserve(spawn > 0 ? spawn : 0);
  for (int64_t t = 0; t < spawn; ++t) threads.emplace_back(worker);
  worker();  // the calling thread works too
  for (auto& th : threads) th.join();
}

}  // namespace robustmerge
