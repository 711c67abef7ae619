// The host side of a CUDA merge that needs no CUDA call: validation of the host tables, the
// derived tables, the workspace layout, the kernel launches in stream order and the result
// copies of validated plan tables (HostPlan). The launcher (launch.cuh) uploads, launches
// and copies from it; the binding's workspace_size / select_plan report it;
// tests/cuda_emu runs every kernel on it on the CPU (merge_emu.cpp), so the emulated merge
// and the real one make the same launches.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../tables.h"  // MergeTables, robustmerge::validate (the CPU kernel's checks and messages)
#include "device_plan.cuh"

namespace robustmerge {
namespace cuda {

// The conditions of robustmerge::validate (tables.h), without a std::string per
// row: true when the tables are valid. Keep in step with that function; validate() below
// falls back to it for the message, and tests/test_cuda_backend.py checks every message.
inline bool tables_valid(const MergeTables& t) {
  if (t.n_items < 1 || t.n_modules < 1) return false;
  if (!t.items || !t.modules || !t.b_scale || !t.status) return false;
  int64_t expected_first = 0;
  for (int64_t m = 0; m < t.n_modules; ++m) {
    const int64_t* row = t.modules + m * kModCols;
    if (row[kModRank] < 1 || row[kModIn] < 1 || row[kModOut] < 1) return false;
    if (row[kModFirst] != expected_first || row[kModMembers] < 1) return false;
    expected_first += row[kModMembers];
    if (expected_first > t.n_items) return false;
    if (!row[kModOutA] || !row[kModOutB]) return false;
    const int64_t od = row[kModOutDtype];
    if (od != kF32 && od != kF16 && od != kBF16 && od != kF64) return false;
    if (row[kModClampIndex] < 0 || row[kModClampIndex] >= row[kModRank]) return false;
    for (int64_t i = row[kModFirst]; i < row[kModFirst] + row[kModMembers]; ++i) {
      const int64_t* it = t.items + i * kItemCols;
      if (!it[kItemA] || !it[kItemB]) return false;
      for (int col : {kItemADtype, kItemBDtype})
        if (it[col] != kF32 && it[col] != kF16 && it[col] != kBF16) return false;
      if (it[kItemKA] < 0 || it[kItemKA] > row[kModRank] * row[kModIn]) return false;
      if (it[kItemKB] < 0 || it[kItemKB] > row[kModRank] * row[kModOut]) return false;
    }
  }
  return expected_first == t.n_items;
}

// The CPU kernel's validation reworded for this backend, plus the limit the device code
// relies on (32-bit counts and column indices). ValueError (std::invalid_argument) names
// the first bad row.
inline void validate(const MergeTables& t) {
  if (!tables_valid(t)) {
    const std::string prefix = "robustmerge cpu kernel: ";
    try {
      MergeTables host = t;
      host.n_threads = 1;
      robustmerge::validate(host);
    } catch (const std::invalid_argument& e) {
      std::string what = e.what();
      if (what.compare(0, prefix.size(), prefix) == 0) what = what.substr(prefix.size());
      throw std::invalid_argument("robustmerge cuda kernel: " + what);
    }
    throw std::invalid_argument("robustmerge cuda kernel: invalid plan tables");  // tables_valid is stricter
  }
  for (int64_t m = 0; m < t.n_modules; ++m) {
    const int64_t* row = t.modules + m * kModCols;
    const int64_t r = row[kModRank];
    if (row[kModIn] > INT32_MAX / r || row[kModOut] > INT32_MAX / r)
      throw std::invalid_argument("robustmerge cuda kernel: module " + std::to_string(m) +
                                  ": a matrix has 2^31 or more elements");
  }
}

// Workspace layout: an uploaded part (tables and derived tables) and a zeroed part
// (results and scratch), each array aligned to 256 bytes.
class Layout {
 public:
  size_t add(size_t bytes) {
    const size_t at = size_;
    size_ = (size_ + bytes + 255) / 256 * 256;
    return at;
  }
  size_t size() const { return size_; }

 private:
  size_t size_ = 0;
};

// The kernels of one merge, in stream order (kernels.cuh).
enum class Kernel { kSelect, kFuseA, kWeights, kFuseB };
struct Launch {
  Kernel kernel;
  int64_t blocks;
  int threads;
  int pass;          // select_kernel's launch number (0 for the others)
  const char* what;  // for the launcher's error message
};

struct Outputs {           // where the launcher copies the results (device addresses; 0: not wanted)
  int32_t* status;         // [n_items], required
  int32_t* module_status;  // [n_modules]
  uint32_t* tau;           // [n_items, 2]
  double* scales;          // items' ranks concatenated
};

struct ResultCopy {  // workspace bytes [from, from + bytes) to dst, after the kernels
  void* dst;
  size_t from, bytes;
};

inline void check_split_elems(int64_t split_elems) {
  if (split_elems < 0)
    throw std::invalid_argument("robustmerge cuda kernel: split_elems must be >= 0 (0 splits every matrix), got " +
                                std::to_string(split_elems));
}

// Derived tables and the workspace layout of validated tables `t`; matrices of more than
// `split_elems` keys take the split selection (select.cuh).
struct HostPlan {
  std::vector<int64_t> item_module, scale_offset, part_offset, tile_first_a, tile_first_b;
  std::vector<int64_t> split_mat, split_first{0};  // split matrices (2 * item + is_b), their first blocks
  int64_t W = 0, M = 0, S = 0, P = 0, split_elems = kDefaultSplitElems;
  int split_passes = 0;  // selection launches of the split path: 0 (none), 2 (16-bit only), 3
  size_t o_items, o_modules, o_bscale, o_item_module, o_scale_offset, o_part_offset, o_tiles_a, o_tiles_b;
  size_t o_split_mat, o_split_first, upload;
  size_t o_tau, o_scales, o_lo, o_weights, o_partials, o_status, o_overflow, o_flag;
  size_t o_split_hist, o_split_arrive, o_split_state, total;

  HostPlan(const MergeTables& t, int64_t split_elems_) : W(t.n_items), M(t.n_modules), split_elems(split_elems_) {
    check_split_elems(split_elems);
    item_module.resize(W);
    scale_offset.assign(W + 1, 0);
    part_offset.assign(W + 1, 0);
    tile_first_a.assign(M + 1, 0);
    tile_first_b.assign(M + 1, 0);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t* md = t.modules + m * kModCols;
      const int64_t r = md[kModRank];
      for (int64_t i = md[kModFirst]; i < md[kModFirst] + md[kModMembers]; ++i) {
        item_module[i] = m;
        scale_offset[i + 1] = scale_offset[i] + r;
        part_offset[i + 1] = part_offset[i] + r * segments_per_row(md[kModIn]);
      }
      tile_first_a[m + 1] = tile_first_a[m] + tiles_a(r, md[kModIn]);
      tile_first_b[m + 1] = tile_first_b[m] + tiles_b(r, md[kModOut]);
    }
    for (int64_t i = 0; i < W; ++i) {
      const int64_t* it = t.items + i * kItemCols;
      const int64_t* md = t.modules + item_module[i] * kModCols;
      for (int f = 0; f < 2; ++f) {
        const int64_t n = f ? md[kModOut] * md[kModRank] : md[kModRank] * md[kModIn];
        if (!split_matrix(n, split_elems)) continue;
        split_mat.push_back(2 * i + f);
        split_first.push_back(split_first.back() + split_blocks(n));
        const int passes = it[f ? kItemBDtype : kItemADtype] == kF32 ? 3 : 2;
        if (passes > split_passes) split_passes = passes;
      }
    }
    if (2 * W + n_split_blocks() > INT32_MAX)
      throw std::invalid_argument("robustmerge cuda kernel: the selection needs more than 2^31 - 1 blocks");
    S = scale_offset[W];
    P = part_offset[W];
    Layout lay;
    o_items = lay.add(sizeof(int64_t) * W * kItemCols);
    o_modules = lay.add(sizeof(int64_t) * M * kModCols);
    o_bscale = lay.add(sizeof(double) * W);
    o_item_module = lay.add(sizeof(int64_t) * W);
    o_scale_offset = lay.add(sizeof(int64_t) * (W + 1));
    o_part_offset = lay.add(sizeof(int64_t) * (W + 1));
    o_tiles_a = lay.add(sizeof(int64_t) * (M + 1));
    o_tiles_b = lay.add(sizeof(int64_t) * (M + 1));
    o_split_mat = lay.add(sizeof(int64_t) * split_mat.size());
    o_split_first = lay.add(sizeof(int64_t) * split_first.size());
    upload = lay.size();
    o_tau = lay.add(sizeof(uint32_t) * 2 * W);
    o_scales = lay.add(sizeof(double) * S);
    o_lo = lay.add(sizeof(double) * W);
    o_weights = lay.add(sizeof(float) * S);
    o_partials = lay.add(sizeof(double) * 2 * P);
    o_status = lay.add(sizeof(int32_t) * W);
    o_overflow = lay.add(sizeof(int32_t) * M);
    o_flag = lay.add(sizeof(int32_t));
    // Split scratch, zeroed by the launcher's memset with the rest; one slot per pass, none reused.
    o_split_hist = lay.add(sizeof(uint32_t) * n_split() * kSplitPasses * kBins);
    o_split_arrive = lay.add(sizeof(uint32_t) * n_split() * kSplitPasses);
    o_split_state = lay.add(sizeof(SplitState) * n_split() * kSplitPasses);
    total = lay.size();
  }

  int64_t n_split() const { return int64_t(split_mat.size()); }
  int64_t n_split_blocks() const { return split_first.back(); }
  // Blocks of each selection launch: the one-block path (2 * W) and the split blocks' pass 0,
  // then one launch per further digit of the split matrices.
  std::vector<int64_t> select_grids() const {
    std::vector<int64_t> grids{2 * W + n_split_blocks()};
    for (int pass = 1; pass < split_passes; ++pass) grids.push_back(n_split_blocks());
    return grids;
  }

  int64_t n_tiles_a() const { return tile_first_a[M]; }
  int64_t n_tiles_b() const { return tile_first_b[M]; }

  // Every launch of the merge, in stream order: the selection (select_grids), then one
  // fuse_a block per A* tile, one weights block per module, one fuse_b block per B* tile.
  std::vector<Launch> launches() const {
    std::vector<Launch> out;
    const std::vector<int64_t> grids = select_grids();
    for (size_t pass = 0; pass < grids.size(); ++pass)  // the stream orders the passes
      out.push_back({Kernel::kSelect, grids[pass], kSelectThreads, int(pass), "select_kernel launch"});
    out.push_back({Kernel::kFuseA, n_tiles_a(), kFuseThreads, 0, "fuse_a_kernel launch"});
    out.push_back({Kernel::kWeights, M, kWeightThreads, 0, "weights_kernel launch"});
    out.push_back({Kernel::kFuseB, n_tiles_b(), kFuseThreads, 0, "fuse_b_kernel launch"});
    return out;
  }

  // What the launcher copies out of the workspace after the kernels (entries with a null
  // dst are skipped): item status, module status (the overflow flags), tau, scales.
  std::array<ResultCopy, 4> result_copies(const Outputs& out) const {
    return {{{out.status, o_status, sizeof(int32_t) * W},
             {out.module_status, o_overflow, sizeof(int32_t) * M},
             {out.tau, o_tau, sizeof(uint32_t) * 2 * W},
             {out.scales, o_scales, sizeof(double) * S}}};
  }

  std::vector<unsigned char> host_image(const MergeTables& t) const {
    std::vector<unsigned char> host(upload, 0);
    std::memcpy(host.data() + o_items, t.items, sizeof(int64_t) * W * kItemCols);
    std::memcpy(host.data() + o_modules, t.modules, sizeof(int64_t) * M * kModCols);
    std::memcpy(host.data() + o_bscale, t.b_scale, sizeof(double) * W);
    std::memcpy(host.data() + o_item_module, item_module.data(), sizeof(int64_t) * W);
    std::memcpy(host.data() + o_scale_offset, scale_offset.data(), sizeof(int64_t) * (W + 1));
    std::memcpy(host.data() + o_part_offset, part_offset.data(), sizeof(int64_t) * (W + 1));
    std::memcpy(host.data() + o_tiles_a, tile_first_a.data(), sizeof(int64_t) * (M + 1));
    std::memcpy(host.data() + o_tiles_b, tile_first_b.data(), sizeof(int64_t) * (M + 1));
    if (n_split()) std::memcpy(host.data() + o_split_mat, split_mat.data(), sizeof(int64_t) * split_mat.size());
    std::memcpy(host.data() + o_split_first, split_first.data(), sizeof(int64_t) * split_first.size());
    return host;
  }

  DevicePlan device_plan(unsigned char* ws, float lam) const {
    DevicePlan p;
    p.items = reinterpret_cast<const int64_t*>(ws + o_items);
    p.modules = reinterpret_cast<const int64_t*>(ws + o_modules);
    p.b_scale = reinterpret_cast<const double*>(ws + o_bscale);
    p.item_module = reinterpret_cast<const int64_t*>(ws + o_item_module);
    p.scale_offset = reinterpret_cast<const int64_t*>(ws + o_scale_offset);
    p.part_offset = reinterpret_cast<const int64_t*>(ws + o_part_offset);
    p.tile_first_a = reinterpret_cast<const int64_t*>(ws + o_tiles_a);
    p.tile_first_b = reinterpret_cast<const int64_t*>(ws + o_tiles_b);
    p.n_items = W;
    p.n_modules = M;
    p.split_elems = split_elems;
    p.split_mat = reinterpret_cast<const int64_t*>(ws + o_split_mat);
    p.split_first = reinterpret_cast<const int64_t*>(ws + o_split_first);
    p.n_split = n_split();
    p.split_hist = reinterpret_cast<uint32_t*>(ws + o_split_hist);
    p.split_arrive = reinterpret_cast<uint32_t*>(ws + o_split_arrive);
    p.split_state = reinterpret_cast<SplitState*>(ws + o_split_state);
    p.tau = reinterpret_cast<uint32_t*>(ws + o_tau);
    p.scales = reinterpret_cast<double*>(ws + o_scales);
    p.lo = reinterpret_cast<double*>(ws + o_lo);
    p.weights = reinterpret_cast<float*>(ws + o_weights);
    p.partials = reinterpret_cast<double*>(ws + o_partials);
    p.status = reinterpret_cast<int32_t*>(ws + o_status);
    p.overflow = reinterpret_cast<int32_t*>(ws + o_overflow);
    p.any_bad = reinterpret_cast<int32_t*>(ws + o_flag);
    p.lam = lam;
    return p;
  }
};

}  // namespace cuda
}  // namespace robustmerge
