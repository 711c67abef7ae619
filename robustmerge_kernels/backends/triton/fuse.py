"""Cross-task normalised fusion (SPEC step 4), every module of a plan in one launch.

Grid (module, program); each program walks blocks of the module's outputs with a
grid-stride loop, first A* (flat), then B* (flat, column = index % rank), and for each
block reads every adapter's block once, in plan order:

    A*[j]    = lam * sum_t [key(A_t[j]) >= tau_t] A_t[j]
    B*[i, c] = lam * sum_t w_t[c] * [key(B_t[i, c]) >= tau_t] (b_scale_t * B_t[i, c])

accumulating in float32 exactly like csrc/robustmerge/fuse.h, then stores in the output
dtype (round to nearest even) and flags a module whose stored values overflowed to inf
(1: A*, 2: B*).
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
def fuse_kernel(items, modules, b_scale, scale_offset, state, weights, module_status, lam, BLOCK: tl.constexpr):
    mod = tl.program_id(0)
    rank = tl.load(modules + mod * MOD_COLS + MOD_RANK).to(tl.int32)
    n_in = tl.load(modules + mod * MOD_COLS + MOD_IN).to(tl.int32)
    n_out = tl.load(modules + mod * MOD_COLS + MOD_OUT).to(tl.int32)
    first = tl.load(modules + mod * MOD_COLS + MOD_FIRST).to(tl.int32)
    members = tl.load(modules + mod * MOD_COLS + MOD_MEMBERS).to(tl.int32)
    out_a = tl.load(modules + mod * MOD_COLS + MOD_OUT_A)
    out_b = tl.load(modules + mod * MOD_COLS + MOD_OUT_B)
    od = tl.load(modules + mod * MOD_COLS + MOD_OUT_DTYPE).to(tl.int32)
    lane = tl.arange(0, BLOCK)
    step = tl.num_programs(1) * BLOCK
    flags = tl.zeros([], dtype=tl.int32)

    size_a = rank * n_in
    for start in range(tl.program_id(1) * BLOCK, size_a, step):
        offs = start + lane
        inside = offs < size_a
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for item in range(first, first + members):
            addr = tl.load(items + item * ITEM_COLS + ITEM_A)
            dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE).to(tl.int32)
            tau = tl.load(state + (2 * item) * STATE_COLS + ST_PREFIX)
            key, val = load_key_value(addr, dt, offs, inside)
            acc += tl.where(key >= tau, val, 0.0)
        flags |= store_out(out_a, od, offs, inside, lam * acc)

    size_b = n_out * rank
    for start in range(tl.program_id(1) * BLOCK, size_b, step):
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
