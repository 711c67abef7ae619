// The host side of a CUDA merge that needs no CUDA call: the derived tables, the workspace
// layout and the selection's launch plan of validated plan tables (HostPlan). The launcher
// (launch.cuh) uploads and launches from it; the binding's workspace_size / select_plan
// report it; tests/cuda_emu runs the selection kernel on it on the CPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../tables.h"  // MergeTables
#include "device_plan.cuh"

namespace robustmerge {
namespace cuda {

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
