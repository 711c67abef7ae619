// RobustMerge over a whole merge plan on a CUDA GPU: the device kernels.
//
// The plan is the same pair of int64 tables as the CPU kernel's (plan_tables.h: ItemCol /
// ModuleCol), copied to the device by the host driver (launch.cuh), plus derived tables
// (item -> module, item -> first A-row scale, item -> first row-sum partial) and the
// fusion tiles. Four grouped kernels cover every module of every adapter:
//
//   1. select_kernel (select.cuh), one block per (item, matrix), and for matrices of more
//      than split_elems keys one block per 32,768-key slice in each of 2-3 launches (one
//      per digit): the exact thresholds and the inf/NaN check (docs/ALGORITHM.md §3 step 1);
//   2. fuse_a_kernel (fuse.cuh), one block per A* row segment: A* and the row sums of
//      |A| and kept |A| (docs/ALGORITHM.md §3 steps 2 and 4 for A);
//   3. weights_kernel, one block per module: A-row scales, clamp, fusion weights (step 3);
//   4. fuse_b_kernel, one block per B* tile: B* (step 4 for B).
//
// Kernels 2-4 return at once when kernel 1 found a non-finite input (the outputs are then
// undefined, as in the CPU kernel; the caller raises). Bytes read per merge: each A twice
// in selection and once in fusion, each B twice plus once (float32: the third selection
// pass reads at most kCandidates keys from shared memory; a split float32 matrix is read
// a third time instead); benchmarks/README.md derives
// the predicted times from this.
#pragma once

#include "fuse.cuh"
#include "select.cuh"
