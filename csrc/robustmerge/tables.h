// The merge plan as both kernels (CPU and CUDA) receive it: two int64 tables built by the
// Python layer (robustmerge_kernels/backends/tables.py), their column names, the status
// codes, and the host-side validation. Plain C++ with no SIMD code, so nvcc compiles it too.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"
#include "plan_tables.h"

namespace robustmerge {

constexpr int kBins = 2048;  // radix digit of the selections (11 bits), CPU and CUDA

// ItemCol, ModuleCol (the table columns) and Status come from plan_tables.h, the one schema.

struct MergeTables {
  const int64_t* items = nullptr;  // [n_items, kItemCols]
  int64_t n_items = 0;
  const double* b_scale = nullptr;  // [n_items]: adapter scaling / output scaling, folded into B
  const int64_t* modules = nullptr;  // [n_modules, kModCols]
  int64_t n_modules = 0;
  double lam = 2.0;
  int n_threads = 1;
  uint32_t* tau_out = nullptr;  // optional [n_items, 2]: thresholds of A and B as magnitude keys
  double* scales_out = nullptr;  // optional: clamped A-row scales, items' ranks concatenated
  int32_t* status = nullptr;     // [n_items]: Status bits
  int32_t* module_status = nullptr;  // optional [n_modules]: 1 A* overflowed its dtype, 2 B* did
};

// The plan part of MergeTables from raw addresses, as both bindings (CPU and CUDA) receive it.
inline MergeTables plan_tables(uintptr_t items, int64_t n_items, uintptr_t b_scale, uintptr_t modules,
                               int64_t n_modules, double lam) {
  MergeTables t;
  t.items = reinterpret_cast<const int64_t*>(items);
  t.n_items = n_items;
  t.b_scale = reinterpret_cast<const double*>(b_scale);
  t.modules = reinterpret_cast<const int64_t*>(modules);
  t.n_modules = n_modules;
  t.lam = lam;
  return t;
}

inline int64_t dtype_size(int64_t dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// Host-side argument checks; throws std::invalid_argument (Python ValueError) with the
// offending row named, before any memory is touched.
inline void validate(const MergeTables& t) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("robustmerge cpu kernel: " + what); };
  if (t.n_items < 1 || t.n_modules < 1) fail("empty plan");
  if (!t.items || !t.modules || !t.b_scale || !t.status) fail("null table pointer");
  if (t.n_threads < 1) fail("n_threads must be >= 1");
  int64_t expected_first = 0;
  for (int64_t m = 0; m < t.n_modules; ++m) {
    const int64_t* row = t.modules + m * kModCols;
    const std::string where = "module " + std::to_string(m) + ": ";
    if (row[kModRank] < 1 || row[kModIn] < 1 || row[kModOut] < 1) fail(where + "shapes must be positive");
    if (row[kModFirst] != expected_first || row[kModMembers] < 1) fail(where + "items must be contiguous, in order");
    expected_first += row[kModMembers];
    if (expected_first > t.n_items) fail(where + "items past the end of the item table");
    if (!row[kModOutA] || !row[kModOutB]) fail(where + "null output pointer");
    const int64_t od = row[kModOutDtype];
    if (od != kF32 && od != kF16 && od != kBF16 && od != kF64) fail(where + "unknown output dtype");
    if (row[kModClampIndex] < 0 || row[kModClampIndex] >= row[kModRank]) fail(where + "clamp index out of range");
    for (int64_t i = row[kModFirst]; i < row[kModFirst] + row[kModMembers]; ++i) {
      const int64_t* it = t.items + i * kItemCols;
      const std::string iw = "item " + std::to_string(i) + ": ";
      if (!it[kItemA] || !it[kItemB]) fail(iw + "null input pointer");
      for (int col : {kItemADtype, kItemBDtype})
        if (it[col] != kF32 && it[col] != kF16 && it[col] != kBF16) fail(iw + "input dtype must be f32, f16 or bf16");
      if (it[kItemKA] < 0 || it[kItemKA] > row[kModRank] * row[kModIn]) fail(iw + "k of A out of range");
      if (it[kItemKB] < 0 || it[kItemKB] > row[kModRank] * row[kModOut]) fail(iw + "k of B out of range");
    }
  }
  if (expected_first != t.n_items) fail("items not covered by any module");
}

}  // namespace robustmerge
