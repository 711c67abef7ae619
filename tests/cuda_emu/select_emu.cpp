// Runs select_kernel (csrc/robustmerge/cuda/select.cuh, unmodified) on the host emulation of
// tests/cuda_emu/cuda_runtime.h, with the launch plan and workspace of host_plan.cuh, for
// plans that take the one-block and the split path (split_elems 0, 40000, never), and checks
// every threshold, status bit and the any_bad flag against a sort. The blocks of each
// launch run in a shuffled order, so the split path's last arrival is a different block
// each time. Exit status 0 when everything matches. Built and run by
// tests/test_cuda_emulated.py: g++ -std=c++17 -I tests/cuda_emu -I csrc.
#include <algorithm>
#include <cstdio>
#include <random>

#include "robustmerge/cuda/host_plan.cuh"
#include "robustmerge/cuda/select.cuh"

using namespace robustmerge;
using namespace robustmerge::cuda;

struct Matrix {
  int dtype;
  int64_t n, k;
  std::vector<unsigned char> buf;
  size_t offset;  // bytes: misalignment of the data pointer
  const void* ptr() const { return buf.data() + offset; }
  uint32_t key(int64_t i) const {
    if (dtype == kF32) { uint32_t v; std::memcpy(&v, buf.data() + offset + 4 * i, 4); return v & 0x7fffffffu; }
    uint16_t v; std::memcpy(&v, buf.data() + offset + 2 * i, 2); return v & 0x7fffu;
  }
  void set(int64_t i, uint32_t bits) {
    if (dtype == kF32) std::memcpy(buf.data() + offset + 4 * i, &bits, 4);
    else { uint16_t h = uint16_t(bits); std::memcpy(buf.data() + offset + 2 * i, &h, 2); }
  }
};

static std::mt19937_64 rng(12345);

// Random finite keys with signs; `levels` > 0: only that many distinct magnitudes (ties).
static Matrix make(int dtype, int64_t n, int64_t k, int levels = 0, size_t misalign_elems = 0) {
  Matrix m{dtype, n, k, {}, 0};
  const size_t es = dtype == kF32 ? 4 : 2;
  m.buf.resize(n * es + 64);
  m.offset = 16 + misalign_elems * es;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    if (dtype == kF32) {
      const uint32_t e = levels ? 120 + uint32_t(rng() % levels) : 100 + uint32_t(rng() % 30);
      bits = (e << 23) | (levels ? 0 : uint32_t(rng() & 0x7fffff));
      if (rng() % 17 == 0) bits = 0;  // zeros crowd one bin
      bits |= uint32_t(rng() & 1) << 31;
    } else {
      const int ebits = dtype == kF16 ? 5 : 8, mbits = dtype == kF16 ? 10 : 7;
      const uint32_t emax = (1u << ebits) - 2;
      const uint32_t e = levels ? emax / 2 + uint32_t(rng() % levels) : 1 + uint32_t(rng() % emax);
      bits = (e << mbits) | (levels ? 0 : uint32_t(rng() & ((1u << mbits) - 1)));
      bits |= uint32_t(rng() & 1) << 15;
    }
    m.set(i, bits);
  }
  return m;
}

struct Module { int64_t r, in, out; std::vector<Matrix> a, b; };

static int run_case(const char* name, std::vector<Module>& mods, int64_t split_elems) {
  std::vector<int64_t> items, modules;
  int64_t first = 0;
  static double out_dummy[1];
  for (auto& md : mods) {
    const int64_t T = int64_t(md.a.size());
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int64_t> row(kItemCols);
      row[kItemA] = int64_t(reinterpret_cast<uintptr_t>(md.a[t].ptr()));
      row[kItemB] = int64_t(reinterpret_cast<uintptr_t>(md.b[t].ptr()));
      row[kItemADtype] = md.a[t].dtype;
      row[kItemBDtype] = md.b[t].dtype;
      row[kItemKA] = md.a[t].k;
      row[kItemKB] = md.b[t].k;
      items.insert(items.end(), row.begin(), row.end());
    }
    std::vector<int64_t> row(kModCols);
    row[kModRank] = md.r, row[kModIn] = md.in, row[kModOut] = md.out, row[kModFirst] = first, row[kModMembers] = T;
    row[kModOutA] = row[kModOutB] = int64_t(reinterpret_cast<uintptr_t>(out_dummy));
    row[kModOutDtype] = kF32, row[kModClampIndex] = 0;
    modules.insert(modules.end(), row.begin(), row.end());
    first += T;
  }
  const int64_t W = first;
  std::vector<double> bs(W, 1.0);
  std::vector<int32_t> st(W, 0);
  MergeTables t;
  t.items = items.data(), t.n_items = W, t.b_scale = bs.data(), t.modules = modules.data();
  t.n_modules = int64_t(mods.size()), t.status = st.data();
  robustmerge::validate(t);
  const HostPlan hp(t, split_elems);
  const std::vector<unsigned char> image = hp.host_image(t);
  std::vector<unsigned char> ws_buf(hp.total + 256);
  unsigned char* ws = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(ws_buf.data()) + 255) / 256 * 256);
  std::memcpy(ws, image.data(), hp.upload);
  std::memset(ws + hp.upload, 0, hp.total - hp.upload);  // the launcher's memset
  const DevicePlan p = hp.device_plan(ws, 2.0f);
  const std::vector<int64_t> grids = hp.select_grids();
  for (size_t pass = 0; pass < grids.size(); ++pass)  // blocks in a shuffled order
    emu::launch(grids[pass], kSelectThreads, rng(), [&] { select_kernel(p, int(pass)); });
  int bad = 0;
  int64_t item = 0;
  for (auto& md : mods) {
    for (size_t tt = 0; tt < md.a.size(); ++tt, ++item) {
      for (int f = 0; f < 2; ++f) {
        const Matrix& m = f ? md.b[tt] : md.a[tt];
        std::vector<uint32_t> keys(m.n);
        bool nonfinite = false;
        const uint32_t nf = m.dtype == kF32 ? 0x7f800000u : m.dtype == kF16 ? 0x7c00u : 0x7f80u;
        for (int64_t i = 0; i < m.n; ++i) keys[i] = m.key(i), nonfinite |= keys[i] >= nf;
        uint32_t expect = 0;
        if (!nonfinite && m.k >= 1) {
          std::nth_element(keys.begin(), keys.begin() + (m.k - 1), keys.end());
          expect = keys[m.k - 1];
        }
        const uint32_t got = p.tau[2 * item + f];
        const bool got_bad = p.status[item] & (f ? kBNonFinite : kANonFinite);
        if (got != expect || got_bad != nonfinite) {
          std::printf("  %s split=%lld item %lld %c (n=%lld k=%lld dtype %d): tau %u expected %u, non-finite %d expected %d\n",
                      name, (long long)split_elems, (long long)item, f ? 'B' : 'A', (long long)m.n, (long long)m.k,
                      m.dtype, got, expect, int(got_bad), int(nonfinite));
          ++bad;
        }
      }
    }
  }
  if (bool(*p.any_bad) != std::any_of(p.status, p.status + W, [](int32_t s) { return s != 0; })) {
    std::printf("  %s: any_bad flag wrong\n", name);
    ++bad;
  }
  std::printf("%s split_elems=%lld: grids", name, (long long)split_elems);
  for (auto g : grids) std::printf(" %lld", (long long)g);
  std::printf(", split matrices %lld: %s\n", (long long)hp.n_split(), bad ? "MISMATCH" : "ok");
  return bad;
}

int main() {
  const int64_t never = int64_t(1) << 62;
  std::vector<int64_t> splits = {0, 40000, never};
  int bad = 0;
  {  // float32 / 16-bit mix, 3 slices with a partial one, k in the middle and at the ends
    std::vector<Module> mods;
    mods.push_back({4, 17501, 9, {make(kF32, 70004, 35002), make(kBF16, 70004, 1)}, {make(kF16, 36, 36), make(kF32, 36, 0)}});
    mods.push_back({2, 3, 40000, {make(kF16, 6, 3), make(kF16, 6, 6)}, {make(kF16, 80000, 0), make(kBF16, 80000, 80000)}});
    for (auto s : splits) bad += run_case("mixed", mods, s);
  }
  {  // ties (3 magnitudes + zeros) in float32, and in bf16; k inside a tie run
    std::vector<Module> mods;
    mods.push_back({1, 65537, 1, {make(kF32, 65537, 30000, 3), make(kBF16, 65537, 65000, 2)}, {make(kF32, 1, 1), make(kF32, 1, 0)}});
    for (auto s : splits) bad += run_case("ties", mods, s);
  }
  {  // inf/NaN at a slice start and at the very end; misaligned data (scalar heads/tails)
    std::vector<Module> mods;
    Matrix nan_f32 = make(kF32, 40000, 20000);
    nan_f32.set(32768, 0x7fc00000u);
    Matrix inf_bf16 = make(kBF16, 40000, 1);
    inf_bf16.set(39999, 0xff80u);
    mods.push_back({1, 40000, 2, {nan_f32, inf_bf16}, {make(kF16, 2, 1), make(kF16, 2, 2)}});
    mods.push_back({1, 50001, 3, {make(kF16, 50001, 25000, 0, 1), make(kF32, 50001, 7, 0, 3)},
                    {make(kBF16, 3, 2, 0, 1), make(kF32, 3, 3, 0, 1)}});
    for (auto s : splits) bad += run_case("nonfinite+misaligned", mods, s);
  }
  std::printf(bad ? "FAILED: %d mismatches\n" : "all ok\n", bad);
  return bad ? 1 : 0;
}
