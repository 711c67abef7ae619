// The whole CUDA merge (csrc/robustmerge/cuda/kernels.cuh: select, fuse_a, weights, fuse_b,
// unmodified) on the host emulation of tests/cuda_emu/cuda_runtime.h, as a C function for
// ctypes. It does what the binding (python/cuda_bindings.cu) and the launcher
// (robustmerge_cuda in launch.cuh) do, with host memory standing for device memory and
// emu::launch for <<<...>>>: the same validation, HostPlan, workspace image upload and
// memset, the launches HostPlan::launches() lists, in that order with those grids, and the
// result copies HostPlan::result_copies() lists. Built as a shared library and called by
// tests/test_cuda_emulated.py on tables from robustmerge_kernels.backends.tables.build_tables
// (CPU tensors: every address in them is a host address here).
#include <random>
#include <stdexcept>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "robustmerge/cuda/host_plan.cuh"
#include "robustmerge/cuda/kernels.cuh"

namespace rm = robustmerge;
namespace rmc = robustmerge::cuda;

namespace {

// The binding's tables (plan_tables + the checks it makes before robustmerge_cuda).
rm::MergeTables checked_tables(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                               int64_t n_modules, double lam, uintptr_t status, int64_t split_elems) {
  rm::MergeTables t = rm::plan_tables(items, n_items, b_scale, modules, n_modules, lam);
  t.n_threads = 1;
  t.status = reinterpret_cast<int32_t*>(status);
  rmc::validate(t);
  rmc::check_split_elems(split_elems);
  return t;
}

void run_kernel(const rmc::Launch& l, const rmc::DevicePlan& p, uint64_t seed) {
  std::function<void()> body;
  switch (l.kernel) {
    case rmc::Kernel::kSelect: body = [&] { rmc::select_kernel(p, l.pass); }; break;
    case rmc::Kernel::kFuseA: body = [&] { rmc::fuse_a_kernel(p); }; break;
    case rmc::Kernel::kWeights: body = [&] { rmc::weights_kernel(p); }; break;
    case rmc::Kernel::kFuseB: body = [&] { rmc::fuse_b_kernel(p); }; break;
  }
  emu::launch(l.blocks, unsigned(l.threads), seed, body);
}

// The device's floating-point environment for the duration of a call: round to nearest,
// subnormals kept (the real build passes nvcc --ftz=false), whatever the caller had set.
struct IeeeMode {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  IeeeMode() { _mm_setcsr(0x1f80u); }  // all exceptions masked, round to nearest, no FTZ / DAZ
  ~IeeeMode() { _mm_setcsr(saved); }
#else
  IeeeMode() {}  // elsewhere the caller's mode stands
#endif
};

// 1: what the binding refuses with ValueError (std::invalid_argument); 2: anything else,
// e.g. emu::Fault (a kernel deadlocked or made a load the hardware refuses).
int fail(const std::exception& e, char* error, size_t error_len) {
  if (error && error_len) std::snprintf(error, error_len, "%s", e.what());
  return dynamic_cast<const std::invalid_argument*>(&e) ? 1 : 2;
}

}  // namespace

extern "C" {

// The merge of the binding's robustmerge(), synchronously. `seed` draws the order of the
// blocks of every launch, of the threads of every block, and the initial workspace and
// shared-memory bytes (their content is undefined on a GPU). Returns 0, or 1 / 2 with a
// message in `error` (fail()).
int rmk_emu_merge(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules, int64_t n_modules,
                  double lam, uintptr_t status, uintptr_t module_status, uintptr_t tau_out, uintptr_t scales_out,
                  int64_t split_elems, uint64_t seed, char* error, size_t error_len) {
  try {
    const rm::MergeTables t = checked_tables(items, n_items, b_scale, modules, n_modules, lam, status, split_elems);
    const rmc::Outputs out{reinterpret_cast<int32_t*>(status), reinterpret_cast<int32_t*>(module_status),
                           reinterpret_cast<uint32_t*>(tau_out), reinterpret_cast<double*>(scales_out)};
    const rmc::HostPlan hp(t, split_elems);
    const std::vector<unsigned char> host = hp.host_image(t);
    std::mt19937_64 rng(seed);
    std::vector<unsigned char> device(hp.total + 256);  // a workspace of undefined content (torch.empty)
    for (auto& byte : device) byte = static_cast<unsigned char>(rng());
    unsigned char* ws = device.data() + (256 - reinterpret_cast<uintptr_t>(device.data()) % 256) % 256;
    std::memcpy(ws, host.data(), hp.upload);            // the launcher's upload
    std::memset(ws + hp.upload, 0, hp.total - hp.upload);  // and its memset
    const IeeeMode ieee;
    const rmc::DevicePlan p = hp.device_plan(ws, static_cast<float>(t.lam));
    for (const rmc::Launch& l : hp.launches()) run_kernel(l, p, rng());
    for (const rmc::ResultCopy& c : hp.result_copies(out))
      if (c.dst) std::memcpy(c.dst, ws + c.from, c.bytes);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, error_len);
  }
}

// The launches rmk_emu_merge makes for these tables: (kernel, blocks, threads, pass) per
// launch into out[4 * i ..] for i < capacity; returns their number, or -1 with `error`
// (a ValueError of the binding's).
int64_t rmk_emu_launches(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules, int64_t n_modules,
                         int64_t split_elems, int64_t* out, int64_t capacity, char* error, size_t error_len) {
  try {
    int32_t unused_status = 0;
    const rm::MergeTables t = checked_tables(items, n_items, b_scale, modules, n_modules, 2.0,
                                             reinterpret_cast<uintptr_t>(&unused_status), split_elems);
    const std::vector<rmc::Launch> launches = rmc::HostPlan(t, split_elems).launches();
    for (int64_t i = 0; i < int64_t(launches.size()) && i < capacity; ++i) {
      const rmc::Launch& l = launches[size_t(i)];
      out[4 * i] = int64_t(l.kernel), out[4 * i + 1] = l.blocks, out[4 * i + 2] = l.threads, out[4 * i + 3] = l.pass;
    }
    return int64_t(launches.size());
  } catch (const std::exception& e) {
    fail(e, error, error_len);
    return -1;
  }
}

}  // extern "C"
