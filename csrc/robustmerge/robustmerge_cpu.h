// RobustMerge over a whole merge plan on the CPU. The plan arrives as two int64 tables
// built by the Python layer (tables.h), so one call covers every module of every adapter
// with no Python loop per tensor. Per (adapter, module) matrix: exact threshold, and for A
// the row-sum ratio scales with the per-task clamp (docs/ALGORITHM.md §3 steps 1-3); per module: the
// normalised fusion across adapters (step 4). The per-element work runs through the SIMD
// path chosen at run time (dispatch.h); this file is the schedule.
#pragma once

#include "tables.h"  // ItemCol, ModuleCol, Status, MergeTables, validate: shared with CUDA

// The CUDA build includes this header for the tables only; the CPU kernels are host code
// with x86 target attributes that nvcc need not see.
#if !defined(__CUDACC__)

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "dtype.h"
#include "parallel.h"
#include "plan_tables.h"
#include "select.h"

namespace robustmerge {

constexpr int64_t kBlock = 8192;  // fusion block of the few-modules schedule, in output elements

// One merge: the per-matrix and per-module steps, and the two ways of scheduling them.
// Both schedules add each output element's terms in plan order with the same kernels, so
// they (and every thread count) give the same bits.
class CpuMerge {
 public:
  CpuMerge(const MergeTables& t, const Kernels& kern) : t_(t), k_(kern), W_(t.n_items), M_(t.n_modules) {
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
  }

  // Returns false when an input holds inf/NaN (item statuses set; outputs are garbage).
  // Output overflow is reported per module in module_status (1: A*, 2: B*).
  bool run() {
    // Enough modules to keep every thread busy: a task takes one whole module and fuses each
    // matrix right after its selection pass, while it is still in cache, so every input is
    // read from memory once. Otherwise spread the matrices, then fusion blocks of the few
    // modules, over the threads.
    if (M_ >= 2 * int64_t(t_.n_threads)) {
      parallel_for(M_, t_.n_threads, [&](int64_t m) { whole_module(m); });
    } else {
      parallel_for(2 * W_, t_.n_threads, [&](int64_t task) { task % 2 ? select_b(task / 2) : select_a(task / 2, nullptr); });
      if (!all_finite()) return finish();
      for (int64_t m = 0; m < M_; ++m) fusion_weights(m);
      std::vector<Block> blocks;
      for (int64_t m = 0; m < M_; ++m) {  // A* flat ranges, B* whole-row ranges
        const int64_t r = mod(m)[kModRank], na = r * mod(m)[kModIn], rows_b = mod(m)[kModOut];
        for (int64_t s = 0; s < na; s += kBlock) blocks.push_back({m, s, std::min(kBlock, na - s), false});
        const int64_t rows_per = std::max<int64_t>(1, kBlock / r);
        for (int64_t s = 0; s < rows_b; s += rows_per) blocks.push_back({m, s, std::min(rows_per, rows_b - s), true});
      }
      parallel_for(int64_t(blocks.size()), t_.n_threads, [&](int64_t b) { fuse_block(blocks[b]); });
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
  const void* a_of(int64_t i) const { return reinterpret_cast<const void*>(item(i)[kItemA]); }
  const void* b_of(int64_t i) const { return reinterpret_cast<const void*>(item(i)[kItemB]); }
  int32_t a_dtype(int64_t i) const { return int32_t(item(i)[kItemADtype]); }
  int32_t b_dtype(int64_t i) const { return int32_t(item(i)[kItemBDtype]); }
  static const char* at_elem(const void* p, int32_t dtype, int64_t offset) {
    return static_cast<const char*>(p) + offset * dtype_size(dtype);
  }

  void store(int64_t m, bool is_b, const float* acc, int64_t offset, int64_t len) {
    const int64_t od = mod(m)[kModOutDtype];
    char* out = reinterpret_cast<char*>(is_b ? mod(m)[kModOutB] : mod(m)[kModOutA]) + offset * dtype_size(od);
    if (!k_.store(out, int32_t(od), acc, len, static_cast<float>(t_.lam))) {
      // Several blocks of one module may report at once: an atomic OR on the module's flag.
      __atomic_fetch_or(&overflow_[m], is_b ? 2 : 1, __ATOMIC_RELAXED);
    }
  }

  void whole_module(int64_t m) {
    thread_local std::vector<float> acc;
    const int64_t first = mod(m)[kModFirst], last = first + mod(m)[kModMembers];
    const int64_t r = mod(m)[kModRank], na = r * mod(m)[kModIn], nb = r * mod(m)[kModOut];
    bool finite = true;
    acc.assign(na, 0.0f);
    for (int64_t i = first; i < last; ++i) {
      // The next matrix's sample, requested now, arrives while this one is worked on.
      i + 1 < last ? prefetch_sample(a_of(i + 1), a_dtype(i + 1), na) : prefetch_sample(b_of(first), b_dtype(first), nb);
      finite = select_a(i, finite ? acc.data() : nullptr) && finite;
    }
    if (finite) store(m, false, acc.data(), 0, na);
    // B's weights come from A's scales only, so each B is fused right after its selection.
    if (finite) fusion_weights(m);
    acc.assign(nb, 0.0f);
    for (int64_t i = first; i < last; ++i) {
      if (i + 1 < last) prefetch_sample(b_of(i + 1), b_dtype(i + 1), nb);
      finite = select_b(i) && finite;
      if (finite) fuse_b(i, r, acc.data(), 0, mod(m)[kModOut]);
    }
    if (finite) store(m, true, acc.data(), 0, nb);
  }

  // docs/ALGORITHM.md §3 steps 1-3 for A of item i: threshold, row-sum ratios, per-task clamp. With acc,
  // the same pass over A (in cache after the selection) also adds the masked A to acc.
  bool select_a(int64_t i, float* acc) {
    thread_local std::vector<uint32_t> candidates, sample;
    thread_local std::vector<double> total, kept, sorted;
    const int64_t* md = mod(item_module_[i]);
    const int64_t r = md[kModRank], n = md[kModIn];
    const Threshold th = select_threshold(k_, a_dtype(i), a_of(i), r * n, item(i)[kItemKA], candidates, sample);
    tau_[2 * i] = th.key;
    if (!th.finite) {
      status_[i] |= kANonFinite;
      return false;
    }
    total.resize(r);
    kept.resize(r);
    k_.a_pass[a_dtype(i)](a_of(i), r, n, th.key, total.data(), kept.data(), acc);
    double* s = scales_.data() + scale_offset_[i];
    // A row whose kept mass is zero has nothing to compensate: scale 1 (docs/ALGORITHM.md §3 step 2).
    for (int64_t row = 0; row < r; ++row) s[row] = kept[row] > 0.0 ? total[row] / kept[row] : 1.0;
    sorted.assign(s, s + r);
    std::sort(sorted.begin(), sorted.end());
    const double lo = sorted[md[kModClampIndex]];  // per-task lower clamp (step 3)
    for (int64_t row = 0; row < r; ++row) s[row] = std::max(s[row], lo);
    return true;
  }

  bool select_b(int64_t i) {
    thread_local std::vector<uint32_t> candidates, sample;
    const int64_t* md = mod(item_module_[i]);
    const Threshold th =
        select_threshold(k_, b_dtype(i), b_of(i), md[kModOut] * md[kModRank], item(i)[kItemKB], candidates, sample);
    tau_[2 * i + 1] = th.key;
    if (!th.finite) status_[i] |= kBNonFinite;
    return th.finite;
  }

  // acc (rows [row0, row0 + rows) of B*) += the masked, weighted B of item i.
  void fuse_b(int64_t i, int64_t r, float* acc, int64_t row0, int64_t rows) {
    k_.b_pass[b_dtype(i)](acc, at_elem(b_of(i), b_dtype(i), row0 * r), rows, r, tau_[2 * i + 1],
                          static_cast<float>(t_.b_scale[i]), weights_.data() + scale_offset_[i]);
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
      if (blk.is_b) {
        fuse_b(i, r, acc.data(), blk.start, blk.len);
      } else {
        k_.a_pass[a_dtype(i)](at_elem(a_of(i), a_dtype(i), offset), 1, len, tau_[2 * i], nullptr, nullptr, acc.data());
      }
    }
    store(blk.module, blk.is_b, acc.data(), offset, len);
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
  const Kernels& k_;
  const int64_t W_, M_;
  std::vector<int64_t> item_module_, scale_offset_;
  std::vector<uint32_t> tau_;
  std::vector<double> scales_;
  std::vector<float> weights_;
  std::vector<int32_t> status_, overflow_;
};

inline bool robustmerge_cpu(const MergeTables& t) { return CpuMerge(t, active_kernels()).run(); }

}  // namespace robustmerge

#endif  // !defined(__CUDACC__)
