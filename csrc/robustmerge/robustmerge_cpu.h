// RobustMerge over a whole merge plan on the CPU, in two parallel phases:
//   1. per (adapter, module) matrix: exact threshold, and for A the row-sum ratio scales
//      with the per-task clamp (SPEC steps 1-3); each matrix is read once from memory;
//   2. per (module, block): the normalised fusion across adapters (step 4).
// The plan arrives as two int64 tables built by the Python layer (columns below), so one
// call covers every module of every adapter with no Python loop per tensor.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype.h"
#include "fuse.h"
#include "parallel.h"
#include "plan_tables.h"
#include "select.h"

namespace robustmerge {

// Item table, module table, Status bits: plan_tables.h.

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

constexpr int64_t kBlock = 8192;  // fusion block, in output elements (fits L1/L2 with T inputs)

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

// One merge: the per-matrix and per-block steps, and the two ways of scheduling them.
class CpuMerge {
 public:
  explicit CpuMerge(const MergeTables& t) : t_(t), W_(t.n_items), M_(t.n_modules) {
    item_module_.resize(W_);
    scale_offset_.assign(W_ + 1, 0);
    for (int64_t m = 0; m < M_; ++m)
      for (int64_t i = mod(m)[kModFirst]; i < mod(m)[kModFirst] + mod(m)[kModMembers]; ++i) item_module_[i] = m;
    for (int64_t i = 0; i < W_; ++i) scale_offset_[i + 1] = scale_offset_[i] + mod(item_module_[i])[kModRank];
    tau_.assign(2 * W_, 0);
    scales_.assign(scale_offset_[W_], 0.0);
    weights_.assign(scale_offset_[W_], 0.0f);
    status_.assign(W_, kOk);
    overflow_.assign(M_, 0);
    for (int64_t m = 0; m < M_; ++m) {  // fusion blocks: A* flat ranges, B* whole-row ranges
      const int64_t r = mod(m)[kModRank], na = r * mod(m)[kModIn], rows_b = mod(m)[kModOut];
      first_block_.push_back(int64_t(blocks_.size()));
      for (int64_t s = 0; s < na; s += kBlock) blocks_.push_back({m, s, std::min(kBlock, na - s), false});
      first_b_block_.push_back(int64_t(blocks_.size()));
      const int64_t rows_per = std::max<int64_t>(1, kBlock / r);
      for (int64_t s = 0; s < rows_b; s += rows_per) blocks_.push_back({m, s, std::min(rows_per, rows_b - s), true});
    }
    first_block_.push_back(int64_t(blocks_.size()));
  }

  // Returns false when an input holds inf/NaN (item statuses set; outputs are garbage).
  // Output overflow is reported per module in module_status (1: A*, 2: B*).
  bool run() {
    // Enough modules to keep every thread busy: a task takes one whole module, so its
    // matrices are fused while still in cache (one pass over memory, not two). Otherwise
    // spread the matrices, then the blocks, of the few modules over the threads.
    if (M_ >= 2 * int64_t(t_.n_threads)) {
      parallel_for(M_, t_.n_threads, [&](int64_t m) { whole_module(m); });
    } else {
      parallel_for(2 * W_, t_.n_threads, [&](int64_t task) { task % 2 ? select_b(task / 2) : select_a(task / 2); });
      if (!all_finite()) return finish();
      for (int64_t m = 0; m < M_; ++m) fusion_weights(m);
      parallel_for(int64_t(blocks_.size()), t_.n_threads, [&](int64_t b) { fuse_block(blocks_[b]); });
    }
    return finish();
  }

 private:
  struct Block {
    int64_t module, start, len;  // A: element range; B: row range
    bool is_b;
  };

  const int64_t* mod(int64_t m) const { return t_.modules + m * kModCols; }
  const int64_t* item(int64_t i) const { return t_.items + i * kItemCols; }

  void whole_module(int64_t m) {
    const int64_t first = mod(m)[kModFirst], last = first + mod(m)[kModMembers];
    bool finite = true;
    for (int64_t i = first; i < last; ++i) finite = select_a(i) && finite;
    for (int64_t b = first_block_[m]; finite && b < first_b_block_[m]; ++b) fuse_block(blocks_[b]);
    for (int64_t i = first; i < last; ++i) finite = select_b(i) && finite;
    if (!finite) return;
    fusion_weights(m);
    for (int64_t b = first_b_block_[m]; b < first_block_[m + 1]; ++b) fuse_block(blocks_[b]);
  }

  // SPEC steps 1-3 for A of item i: threshold, row-sum ratios, per-task clamp.
  bool select_a(int64_t i) {
    thread_local std::vector<uint32_t> candidates;
    thread_local std::vector<double> total, kept, sorted;
    const int64_t* it = item(i);
    const int64_t* md = mod(item_module_[i]);
    const int64_t r = md[kModRank], n = md[kModIn];
    bool finite = true;
    dispatch_dtype(int32_t(it[kItemADtype]), [&](auto tr) {
      using Tr = decltype(tr);
      const auto* a = reinterpret_cast<const typename Tr::Storage*>(it[kItemA]);
      const Threshold th = select_threshold<Tr>(a, r * n, it[kItemKA], candidates);
      tau_[2 * i] = th.key;
      finite = th.finite;
      if (!finite) return;
      total.resize(r);
      kept.resize(r);
      row_abs_sums<Tr>(a, r, n, th.key, total.data(), kept.data());
      double* s = scales_.data() + scale_offset_[i];
      // A row whose kept mass is zero has nothing to compensate: scale 1 (SPEC step 2).
      for (int64_t row = 0; row < r; ++row) s[row] = kept[row] > 0.0 ? total[row] / kept[row] : 1.0;
      sorted.assign(s, s + r);
      std::sort(sorted.begin(), sorted.end());
      const double lo = sorted[md[kModClampIndex]];  // per-task lower clamp (step 3)
      for (int64_t row = 0; row < r; ++row) s[row] = std::max(s[row], lo);
    });
    if (!finite) status_[i] |= kANonFinite;
    return finite;
  }

  bool select_b(int64_t i) {
    thread_local std::vector<uint32_t> candidates;
    const int64_t* it = item(i);
    const int64_t* md = mod(item_module_[i]);
    bool finite = true;
    dispatch_dtype(int32_t(it[kItemBDtype]), [&](auto tr) {
      using Tr = decltype(tr);
      const auto* b = reinterpret_cast<const typename Tr::Storage*>(it[kItemB]);
      const Threshold th = select_threshold<Tr>(b, md[kModOut] * md[kModRank], it[kItemKB], candidates);
      tau_[2 * i + 1] = th.key;
      finite = th.finite;
    });
    if (!finite) status_[i] |= kBNonFinite;
    return finite;
  }

  // w_t[c] = s_t[c] / sum_t s_t[c], in [0, 1] (double, then float), adapters in plan order.
  void fusion_weights(int64_t m) {
    const int64_t r = mod(m)[kModRank], first = mod(m)[kModFirst], members = mod(m)[kModMembers];
    for (int64_t c = 0; c < r; ++c) {
      double sum = 0.0;
      for (int64_t k = 0; k < members; ++k) sum += scales_[scale_offset_[first + k] + c];
      for (int64_t k = 0; k < members; ++k) {
        const int64_t at = scale_offset_[first + k] + c;
        weights_[at] = static_cast<float>(scales_[at] / sum);
      }
    }
  }

  void fuse_block(const Block& blk) {
    thread_local std::vector<float> acc;
    const int64_t* md = mod(blk.module);
    const int64_t r = md[kModRank];
    const int64_t len = blk.is_b ? blk.len * r : blk.len;
    const int64_t offset = blk.is_b ? blk.start * r : blk.start;  // in elements
    acc.assign(len, 0.0f);
    for (int64_t i = md[kModFirst]; i < md[kModFirst] + md[kModMembers]; ++i) {
      const int64_t* it = item(i);
      if (blk.is_b) {
        dispatch_dtype(int32_t(it[kItemBDtype]), [&](auto tr) {
          using Tr = decltype(tr);
          const auto* b = reinterpret_cast<const typename Tr::Storage*>(it[kItemB]) + offset;
          accumulate_masked_weighted<Tr>(acc.data(), b, blk.len, r, tau_[2 * i + 1], static_cast<float>(t_.b_scale[i]),
                                         weights_.data() + scale_offset_[i]);
        });
      } else {
        dispatch_dtype(int32_t(it[kItemADtype]), [&](auto tr) {
          using Tr = decltype(tr);
          const auto* a = reinterpret_cast<const typename Tr::Storage*>(it[kItemA]) + offset;
          accumulate_masked<Tr>(acc.data(), a, len, tau_[2 * i]);
        });
      }
    }
    const int64_t od = md[kModOutDtype];
    char* out = reinterpret_cast<char*>(blk.is_b ? md[kModOutB] : md[kModOutA]) + offset * dtype_size(od);
    if (!store_scaled(out, int32_t(od), acc.data(), len, static_cast<float>(t_.lam))) {
      // Several blocks of one module may report at once: an atomic OR on the module's flag.
      __atomic_fetch_or(&overflow_[blk.module], blk.is_b ? 2 : 1, __ATOMIC_RELAXED);
    }
  }

  bool all_finite() const {
    return std::all_of(status_.begin(), status_.end(), [](int32_t s) { return s == kOk; });
  }

  bool finish() {
    std::copy(status_.begin(), status_.end(), t_.status);
    if (t_.module_status) std::copy(overflow_.begin(), overflow_.end(), t_.module_status);
    if (t_.tau_out) std::copy(tau_.begin(), tau_.end(), t_.tau_out);
    if (t_.scales_out) std::copy(scales_.begin(), scales_.end(), t_.scales_out);
    return all_finite();
  }

  const MergeTables& t_;
  const int64_t W_, M_;
  std::vector<int64_t> item_module_, scale_offset_, first_block_, first_b_block_;
  std::vector<uint32_t> tau_;
  std::vector<double> scales_;
  std::vector<float> weights_;
  std::vector<int32_t> status_, overflow_;
  std::vector<Block> blocks_;
};

inline bool robustmerge_cpu(const MergeTables& t) { return CpuMerge(t).run(); }

}  // namespace robustmerge
