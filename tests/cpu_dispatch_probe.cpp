// Test probe for tests/test_cpu_dispatch.py (compiled there, run natively and under qemu-user
// with older CPU models): one merge with the SIMD path the dispatcher picks, or argv[1];
// prints the path, whether the merge succeeded, and an FNV-1a hash of the outputs,
// thresholds and scales, which must be the same for every path and CPU.
#include <cstdio>
#include <cstring>
#include <vector>
#include "robustmerge/robustmerge_cpu.h"
namespace rm = robustmerge;
int main(int argc, char** argv) {
  if (argc > 1) rm::set_path(argv[1]);
  const int64_t T = 3, r = 16, n = 2048, m = 1500;
  std::vector<std::vector<float>> a(T, std::vector<float>(r * n)), b(T, std::vector<float>(m * r));
  uint64_t s = 88172645463325252ull;
  auto rnd = [&] { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return float(int64_t(s >> 40) - (1 << 23)) * 0x1p-30f; };
  for (auto& x : a) for (auto& v : x) v = rnd() * float(1 << (s % 40)) * 0x1p-20f;
  for (auto& x : b) for (auto& v : x) v = rnd();
  std::vector<int64_t> items, mods;
  std::vector<double> bs = {1.0, 0.5, 2.0};
  std::vector<float> oa(r * n), ob(m * r);
  for (int t = 0; t < T; ++t)
    items.insert(items.end(), {int64_t(a[t].data()), int64_t(b[t].data()), 0, 0, int64_t(0.8 * r * n), int64_t(0.8 * m * r)});
  mods = {r, n, m, 0, T, int64_t(oa.data()), int64_t(ob.data()), 0, 12};
  rm::MergeTables t = rm::plan_tables(uintptr_t(items.data()), T, uintptr_t(bs.data()), uintptr_t(mods.data()), 1, 2.0);
  std::vector<int32_t> status(T), mstatus(1);
  std::vector<uint32_t> tau(2 * T);
  std::vector<double> scales(T * r);
  t.n_threads = 2; t.status = status.data(); t.module_status = mstatus.data(); t.tau_out = tau.data(); t.scales_out = scales.data();
  rm::validate(t);
  const bool ok = rm::robustmerge_cpu(t);
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, size_t len) { for (size_t i = 0; i < len; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 1099511628211ull; };
  mix(oa.data(), oa.size() * 4); mix(ob.data(), ob.size() * 4); mix(tau.data(), tau.size() * 4); mix(scales.data(), scales.size() * 8);
  std::printf("%s %d %016llx\n", rm::active_kernels().name, int(ok), (unsigned long long)h);
}
