"""Cross-task normalised fusion (docs/ALGORITHM.md §3 step 4), every module of a plan in one launch per
factor, in plan order:

    A*[j]    = lam * sum_t [key(A_t[j]) >= tau_t] A_t[j]
    B*[i, c] = lam * sum_t w_t[c] * [key(B_t[i, c]) >= tau_t] (b_scale_t * B_t[i, c])

accumulating in float32 exactly like csrc/robustmerge/simd_kernels.h, then stores in the output
dtype (round to nearest even) and flags a module whose stored values overflowed to inf
(1: A*, 2: B*).

FACTOR 0 (A*): grid (module, program), programs stride over the module's (row, chunk)
units, a chunk being BLOCK columns of one row of A, so each unit also yields, per adapter,
the chunk's sum of |A_t| and of kept |A_t| in float64: written as partials
[part_offset[item] + row * chunks + chunk], which weights_kernel (scales.py) sums in chunk
order into the A-row scales. So the row sums cost no read of A of their own.
FACTOR 1 (B*): flat blocks (column = index % rank), after the weights exist.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    ITEM_A,
    ITEM_A_DTYPE,
    ITEM_B,
    ITEM_B_DTYPE,
    ITEM_COLS,
    MOD_COLS,
    MOD_FIRST,
    MOD_IN,
    MOD_MEMBERS,
    MOD_OUT,
    MOD_OUT_A,
    MOD_OUT_B,
    MOD_OUT_DTYPE,
    MOD_RANK,
    ST_PREFIX,
    STATE_COLS,
    load_key_value,
    store_out,
)


@triton.jit
def fuse_kernel(
    items,
    modules,
    b_scale,
    scale_offset,
    part_offset,
    partials,
    state,
    weights,
    module_status,
    lam,
    FACTOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mod = tl.program_id(0)
    rank = tl.load(modules + mod * MOD_COLS + MOD_RANK).to(tl.int32)
    n_in = tl.load(modules + mod * MOD_COLS + MOD_IN).to(tl.int32)
    n_out = tl.load(modules + mod * MOD_COLS + MOD_OUT).to(tl.int32)
    first = tl.load(modules + mod * MOD_COLS + MOD_FIRST).to(tl.int32)
    members = tl.load(modules + mod * MOD_COLS + MOD_MEMBERS).to(tl.int32)
    od = tl.load(modules + mod * MOD_COLS + MOD_OUT_DTYPE).to(tl.int32)
    lane = tl.arange(0, BLOCK)
    flags = tl.zeros([], dtype=tl.int32)

    if FACTOR == 0:
        out_a = tl.load(modules + mod * MOD_COLS + MOD_OUT_A)
        chunks = tl.cdiv(n_in, BLOCK)
        for unit in range(tl.program_id(1), rank * chunks, tl.num_programs(1)):
            row = unit // chunks
            col = (unit % chunks) * BLOCK + lane
            inside = col < n_in
            offs = row * n_in + col
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for item in range(first, first + members):
                addr = tl.load(items + item * ITEM_COLS + ITEM_A)
                dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE).to(tl.int32)
                tau = tl.load(state + (2 * item) * STATE_COLS + ST_PREFIX)
                key, val = load_key_value(addr, dt, offs, inside)
                kept = key >= tau
                acc += tl.where(kept, val, 0.0)
                mag = tl.where(inside, tl.abs(val), 0.0).to(tl.float64)
                at = (tl.load(part_offset + item) + unit) * 2
                tl.store(partials + at, tl.sum(mag, axis=0))
                tl.store(partials + at + 1, tl.sum(tl.where(kept, mag, 0.0), axis=0))
            flags |= store_out(out_a, od, offs, inside, lam * acc)
    else:
        out_b = tl.load(modules + mod * MOD_COLS + MOD_OUT_B)
        size_b = n_out * rank
        for start in range(tl.program_id(1) * BLOCK, size_b, tl.num_programs(1) * BLOCK):
            offs = start + lane
            inside = offs < size_b
            col = offs % rank
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for item in range(first, first + members):
                addr = tl.load(items + item * ITEM_COLS + ITEM_B)
                dt = tl.load(items + item * ITEM_COLS + ITEM_B_DTYPE).to(tl.int32)
                tau = tl.load(state + (2 * item + 1) * STATE_COLS + ST_PREFIX)
                bs = tl.load(b_scale + item).to(tl.float32)
                offset = tl.load(scale_offset + item)
                w = tl.load(weights + offset + col, mask=inside, other=0.0)
                key, val = load_key_value(addr, dt, offs, inside)
                v = tl.where(key >= tau, val * bs, 0.0)
                acc += v * w
            flags |= 2 * store_out(out_b, od, offs, inside, lam * acc)

    tl.atomic_or(module_status + mod, flags)
