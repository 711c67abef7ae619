"""Exact magnitude thresholds (SPEC step 1) by histogram radix select, every matrix of a
plan in one launch per pass.

The threshold of a matrix X with N values is tau = the k-th smallest magnitude key
(1-based), i.e. exactly ``torch.kthvalue(|X|.flatten(), k)``. Keys are the value bits with
the sign cleared, ordered as the magnitudes are. They are found digit by digit:

    float32  keys have 31 bits: digits of 11, 11 and 9 bits (bits 30-20, 19-9, 8-0)
    16-bit   keys have 15 bits: digits of 11 and 4 bits (bits 14-4, 3-0)

Pass p histograms digit p of the keys whose higher digits equal the prefix found so far
(``hist_kernel``: grid (matrix, program) with a grid-stride loop over the matrix, one
``tl.histogram`` per block, summed in registers and added once to a global [matrix, 2048]
buffer), then ``select_kernel`` (one program per matrix) finds the bin holding the
remaining rank by a cumulative sum, appends the digit to the prefix and subtracts the keys
of the bins below from the rank. After the last digit the prefix is the threshold key.
No sort anywhere. Pass 0 also reveals inf/NaN: their keys fill the topmost bins.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    BINS,
    F16,
    F32,
    ITEM_A,
    ITEM_A_DTYPE,
    ITEM_COLS,
    ST_ACTIVE,
    ST_NUMEL,
    ST_PREFIX,
    ST_RANK,
    STATE_COLS,
    load_key,
)


@triton.jit
def _digit(dt, PASS: tl.constexpr):
    """(shift, width) of digit PASS for dtype code dt; width 0 when the key has no such digit."""
    wide = dt == F32
    if PASS == 0:
        shift = tl.where(wide, 20, 4)
        width = tl.where(wide, 11, 11)
    elif PASS == 1:
        shift = tl.where(wide, 9, 0)
        width = tl.where(wide, 11, 4)
    else:
        shift = tl.where(wide, 0, 0)
        width = tl.where(wide, 9, 0)
    return shift, width


@triton.jit
def hist_kernel(items, state, hist, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit PASS over the keys of matrix program_id(0) that match its prefix."""
    mat = tl.program_id(0)
    item = mat // 2
    factor = mat % 2
    addr = tl.load(items + item * ITEM_COLS + ITEM_A + factor)
    dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE + factor).to(tl.int32)
    numel = tl.load(state + mat * STATE_COLS + ST_NUMEL)
    active = tl.load(state + mat * STATE_COLS + ST_ACTIVE)
    prefix = tl.load(state + mat * STATE_COLS + ST_PREFIX)
    shift, width = _digit(dt, PASS)
    high = shift + width  # bits at and above `high` must equal the prefix's
    digit_mask = (1 << width) - 1
    # Pass 0 runs on every matrix (it is also the inf/NaN check); later passes only on
    # matrices with digits left to find.
    if PASS == 0:
        limit = numel
    else:
        limit = tl.where(active != 0, numel, 0)
    want = prefix >> high
    counts = tl.zeros([BINS], dtype=tl.int32)
    lane = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * BLOCK, limit, tl.num_programs(1) * BLOCK):
        offs = start + lane
        inside = offs < limit
        key = load_key(addr, dt, offs, inside)
        match = inside & ((key >> high) == want)
        counts += tl.histogram((key >> shift) & digit_mask, BINS, mask=match)
    # Only the non-empty bins: magnitudes crowd into a few bins, so this is a few dozen atomics.
    tl.atomic_add(hist + mat * BINS + tl.arange(0, BINS), counts, mask=counts != 0)


@triton.jit
def select_kernel(items, state, hist, status, PASS: tl.constexpr, LAST_PASS: tl.constexpr):
    """Fix digit PASS of matrix program_id(0)'s threshold from its histogram."""
    mat = tl.program_id(0)
    item = mat // 2
    factor = mat % 2
    dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE + factor).to(tl.int32)
    active = tl.load(state + mat * STATE_COLS + ST_ACTIVE)
    prefix = tl.load(state + mat * STATE_COLS + ST_PREFIX)
    rank = tl.load(state + mat * STATE_COLS + ST_RANK)
    bins = tl.arange(0, BINS)
    counts = tl.load(hist + mat * BINS + bins)
    if PASS == 0:
        # inf/NaN keys: exponent all ones, i.e. key >= 0x7f800000 (f32), 0x7c00 (f16), 0x7f80 (bf16).
        first_bad = tl.where(dt == F16, 0x7C00 >> 4, 0x7F8)
        bad = tl.sum(tl.where(bins >= first_bad, counts, 0), axis=0) > 0
        tl.store(status + mat, bad.to(tl.int32))
        active = tl.where(bad, 0, active)
    shift, width = _digit(dt, PASS)
    cum = tl.cumsum(counts, axis=0)
    digit = tl.sum((cum < rank).to(tl.int32), axis=0)  # the first bin whose cumulative count reaches rank
    below = tl.sum(tl.where(bins < digit, counts, 0), axis=0)
    on = (active != 0) & (width > 0)
    prefix = tl.where(on, prefix | (digit << shift), prefix)
    rank = tl.where(on, rank - below, rank)
    done = (shift == 0) | LAST_PASS
    active = tl.where(on & ~done, 1, 0)
    tl.store(state + mat * STATE_COLS + ST_PREFIX, prefix)
    tl.store(state + mat * STATE_COLS + ST_RANK, rank)
    tl.store(state + mat * STATE_COLS + ST_ACTIVE, active)
