"""A-row scales (SPEC steps 2-3) and the fusion weights, from the thresholds of select.py.

``rowsum_kernel`` (grid (item, program), a grid-stride loop over A's rows): per row the
total |A| and the kept |A| (key >= tau) in float64, then s = total / kept, or 1 where
nothing is kept. ``weights_kernel`` (one program per module): per task the lower clamp
s = max(s, v[clamp_index]) with v the sorted scales, found by counting (the value whose
count of smaller scales is <= clamp_index < its count of smaller-or-equal scales), no sort;
then w_t = s_t / sum_t s_t summed in float64 in plan order, stored as float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    ITEM_A,
    ITEM_A_DTYPE,
    ITEM_COLS,
    MOD_CLAMP_INDEX,
    MOD_COLS,
    MOD_FIRST,
    MOD_IN,
    MOD_MEMBERS,
    MOD_RANK,
    ST_PREFIX,
    STATE_COLS,
    load_key_value,
)


@triton.jit
def rowsum_kernel(items, modules, item_module, scale_offset, state, raw_scales, BLOCK: tl.constexpr):
    item = tl.program_id(0)
    mod = tl.load(item_module + item)
    rank = tl.load(modules + mod * MOD_COLS + MOD_RANK).to(tl.int32)
    cols = tl.load(modules + mod * MOD_COLS + MOD_IN).to(tl.int32)
    addr = tl.load(items + item * ITEM_COLS + ITEM_A)
    dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE).to(tl.int32)
    tau = tl.load(state + (2 * item) * STATE_COLS + ST_PREFIX)
    offset = tl.load(scale_offset + item)
    lane = tl.arange(0, BLOCK)
    for row in range(tl.program_id(1), rank, tl.num_programs(1)):
        total = tl.zeros([BLOCK], dtype=tl.float64)
        kept = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, cols, BLOCK):
            inside = start + lane < cols
            key, val = load_key_value(addr, dt, row * cols + start + lane, inside)
            mag = tl.where(inside, tl.abs(val), 0.0).to(tl.float64)
            total += mag
            kept += tl.where(key >= tau, mag, 0.0)
        t = tl.sum(total, axis=0)
        k = tl.sum(kept, axis=0)
        # A row whose kept mass is zero has nothing to compensate: scale 1 (SPEC step 2).
        s = tl.where(k > 0.0, t / tl.where(k > 0.0, k, 1.0), 1.0)
        tl.store(raw_scales + offset + row, s)


@triton.jit
def weights_kernel(modules, scale_offset, raw_scales, scales, weights, RANK_BLOCK: tl.constexpr):
    mod = tl.program_id(0)
    rank = tl.load(modules + mod * MOD_COLS + MOD_RANK).to(tl.int32)
    first = tl.load(modules + mod * MOD_COLS + MOD_FIRST).to(tl.int32)
    members = tl.load(modules + mod * MOD_COLS + MOD_MEMBERS).to(tl.int32)
    clamp_index = tl.load(modules + mod * MOD_COLS + MOD_CLAMP_INDEX).to(tl.int32)
    c = tl.arange(0, RANK_BLOCK)
    inside = c < rank
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
