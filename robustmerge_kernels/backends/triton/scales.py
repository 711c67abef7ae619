"""A-row scales (docs/ALGORITHM.md §3 steps 2-3) and the fusion weights, from the row-sum partials the A
fusion writes (fuse.py, FACTOR 0).

``weights_kernel`` (one program per module): per task the raw scales s = total / kept over
each row's chunks summed in order (float64; 1 where nothing is kept), the lower clamp
s = max(s, v[clamp_index]) with v the sorted scales, found by counting (the value whose
count of smaller scales is <= clamp_index < its count of smaller-or-equal scales), no sort;
then w_t = s_t / sum_t s_t summed in float64 in plan order, stored as float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import MOD_CLAMP_INDEX, MOD_COLS, MOD_FIRST, MOD_IN, MOD_MEMBERS, MOD_RANK


@triton.jit
def weights_kernel(
    modules,
    scale_offset,
    part_offset,
    partials,
    raw_scales,
    scales,
    weights,
    RANK_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    mod = tl.program_id(0)
    rank = tl.load(modules + mod * MOD_COLS + MOD_RANK).to(tl.int32)
    first = tl.load(modules + mod * MOD_COLS + MOD_FIRST).to(tl.int32)
    members = tl.load(modules + mod * MOD_COLS + MOD_MEMBERS).to(tl.int32)
    clamp_index = tl.load(modules + mod * MOD_COLS + MOD_CLAMP_INDEX).to(tl.int32)
    chunks = tl.cdiv(tl.load(modules + mod * MOD_COLS + MOD_IN).to(tl.int32), CHUNK)
    c = tl.arange(0, RANK_BLOCK)
    inside = c < rank
    # Raw scales from the A fusion's partials: each row's chunks summed in order.
    for item in range(first, first + members):
        offset = tl.load(scale_offset + item)
        at = (tl.load(part_offset + item) + c * chunks) * 2
        row_total = tl.zeros([RANK_BLOCK], dtype=tl.float64)
        row_kept = tl.zeros([RANK_BLOCK], dtype=tl.float64)
        for chunk in range(chunks):
            row_total += tl.load(partials + at + 2 * chunk, mask=inside, other=0.0)
            row_kept += tl.load(partials + at + 2 * chunk + 1, mask=inside, other=0.0)
        # A row whose kept mass is zero has nothing to compensate: scale 1 (docs/ALGORITHM.md §3 step 2).
        s = tl.where(row_kept > 0.0, row_total / tl.where(row_kept > 0.0, row_kept, 1.0), 1.0)
        tl.store(raw_scales + offset + c, s, mask=inside)
    tl.debug_barrier()  # this program's raw scales are read back below by other threads
    total = tl.zeros([RANK_BLOCK], dtype=tl.float64)
    for item in range(first, first + members):
        offset = tl.load(scale_offset + item)
        s = tl.load(raw_scales + offset + c, mask=inside, other=0.0)
        less = tl.zeros([RANK_BLOCK], dtype=tl.int32)
        less_eq = tl.zeros([RANK_BLOCK], dtype=tl.int32)
        for j in range(0, rank):
            sj = tl.load(raw_scales + offset + j)
            less += (sj < s).to(tl.int32)
            less_eq += (sj <= s).to(tl.int32)
        at_index = inside & (less <= clamp_index) & (clamp_index < less_eq)
        lo = tl.max(tl.where(at_index, s, 0.0), axis=0)  # scales are >= 1 > 0
        s = tl.maximum(s, lo)
        tl.store(scales + offset + c, s, mask=inside)
        total += tl.where(inside, s, 0.0)
    total = tl.where(inside, total, 1.0)
    for item in range(first, first + members):
        offset = tl.load(scale_offset + item)
        s = tl.load(scales + offset + c, mask=inside, other=0.0)
        tl.store(weights + offset + c, (s / total).to(tl.float32), mask=inside)
