"""Exact magnitude thresholds (docs/ALGORITHM.md §3 step 1) by histogram radix select, every matrix of a
plan in one launch per pass.

The threshold of a matrix X with N values is tau = the k-th smallest magnitude key
(1-based), i.e. exactly ``torch.kthvalue(|X|.flatten(), k)``. Keys are the value bits with
the sign cleared, ordered as the magnitudes are. They are found digit by digit, BITS bits
per digit from the top (``digit_bits()`` picks BITS for the installed triton):

    BITS = 11   float32 keys (31 bits): digits 30-20, 19-9, 8-0; 16-bit keys (15): 14-4, 3-0
    BITS = 8    float32: 30-23, 22-15, 14-7, 6-0 (4 passes); 16-bit: 14-7, 6-0 (2 passes)

Pass p histograms digit p of the keys whose higher digits equal the prefix found so far
(``hist_kernel``: grid (matrix, program) with a grid-stride loop over the matrix, one
``tl.histogram`` per block, summed in registers and added once to a global
[matrix, 2**BITS] buffer with relaxed atomics). The last program of a matrix to finish
(a per-matrix arrival counter, acq_rel) then fixes the digit in the same launch: it finds
the bin holding the remaining rank by a cumulative sum, appends the digit to the prefix
and subtracts the keys of the bins below from the rank. After the last digit the prefix
is the threshold key. No sort anywhere. Pass 0 also reveals inf/NaN: their keys fill the
topmost bins.

Why BITS depends on triton: up to triton 3.6, ``tl.histogram`` lowers to ballots and
popcounts whose cost grows with the bin count (about 7.6 warp instructions per key and
180-255 registers at 2,048 bins); from 3.7 it uses shared-memory atomics, for which 2,048
bins cost little. 256 bins cut the old lowering's work per key and its registers several
fold at the price of one more pass over float32 matrices.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .common import (
    F16,
    F32,
    ITEM_A,
    ITEM_A_DTYPE,
    ITEM_COLS,
    ST_ACTIVE,
    ST_COUNT,
    ST_NUMEL,
    ST_PREFIX,
    ST_RANK,
    STATE_COLS,
    load_key,
    load_key_full,
)


def digit_bits(version: str | None = None) -> int:
    """Bits per radix digit for this triton: 11 (2,048 bins) where tl.histogram uses shared
    atomics (>= 3.7), else 8. RMK_TRITON_RADIX_BITS (4-11) overrides, e.g. to test both."""
    override = os.environ.get("RMK_TRITON_RADIX_BITS", "").strip()
    if override:
        bits = int(override)
        if not 4 <= bits <= 11:
            raise ValueError(f"RMK_TRITON_RADIX_BITS must be 4..11, got {bits}")
        return bits
    parts = (version or triton.__version__).split(".")
    major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    return 11 if (major, minor) >= (3, 7) else 8


def passes(bits: int, wide: bool) -> int:
    """Digits of BITS bits in a float32 (31-bit) or 16-bit (15-bit) magnitude key."""
    return -(-(31 if wide else 15) // bits)


@triton.jit
def _digit(dt, PASS: tl.constexpr, BITS: tl.constexpr):
    """(shift, width) of digit PASS for dtype code dt; width 0 when the key has no such digit."""
    high = tl.where(dt == F32, 31, 15) - PASS * BITS  # bits at and above `high` are fixed
    shift = tl.maximum(high - BITS, 0)
    width = tl.maximum(high - shift, 0)
    return shift, width


@triton.jit
def hist_kernel(
    items,
    state,
    hist,
    arrive,
    status,
    cand,
    cand_count,
    PASS: tl.constexpr,
    LAST_PASS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    CAP: tl.constexpr,
    CAPTURE: tl.constexpr,
    FROM_CANDIDATES: tl.constexpr,
):
    """Histogram of digit PASS over the keys of matrix program_id(0) that match its prefix;
    the matrix's last program to finish then fixes the digit (``_select_digit``).

    CAPTURE (pass 1 of plans with float32 keys): the keys counted here, which are exactly
    the ST_COUNT keys of pass 0's digit, are also compacted into the matrix's CAP-key slot
    of ``cand`` when they fit (per block: a cumulative sum for the positions, one atomic
    for the slot's fill). FROM_CANDIDATES (passes >= 2): a matrix whose keys were captured
    reads them there instead of the whole matrix. The order of the keys in ``cand`` varies
    with scheduling; counts, and so thresholds, do not.
    """
    BINS: tl.constexpr = 1 << BITS
    mat = tl.program_id(0)
    item = mat // 2
    factor = mat % 2
    addr = tl.load(items + item * ITEM_COLS + ITEM_A + factor)
    dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE + factor).to(tl.int32)
    numel = tl.load(state + mat * STATE_COLS + ST_NUMEL)
    active = tl.load(state + mat * STATE_COLS + ST_ACTIVE)
    prefix = tl.load(state + mat * STATE_COLS + ST_PREFIX)
    shift, width = _digit(dt, PASS, BITS)
    high = shift + width  # bits at and above `high` must equal the prefix's
    digit_mask = (1 << width) - 1
    # Pass 0 runs on every matrix (it is also the inf/NaN check); later passes only on
    # matrices with digits left to find.
    if PASS == 0:
        limit = numel
    else:
        limit = tl.where(active != 0, numel, 0)
    count = tl.load(state + mat * STATE_COLS + ST_COUNT)  # set by pass 0
    slot = cand + mat.to(tl.int64) * CAP
    use_cand = False
    if FROM_CANDIDATES:
        use_cand = count <= CAP
        limit = tl.where(use_cand, tl.where(active != 0, count, 0), limit)
    want = prefix >> high
    counts = tl.zeros([BINS], dtype=tl.int32)
    lane = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * BLOCK, limit, tl.num_programs(1) * BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + lane, BLOCK), BLOCK)
        if use_cand:  # captured keys (int32, sign already clear)
            inside = offs < limit
            key = tl.load(slot + offs, mask=inside, other=0)
            match = inside & ((key >> high) == want)
        elif start + BLOCK <= limit:  # a whole block: unmasked, so the loads can be vectors
            key = load_key_full(addr, dt, offs, ALIGNED)
            match = (key >> high) == want
        else:
            inside = offs < limit
            key = load_key(addr, dt, offs, inside)
            match = inside & ((key >> high) == want)
        counts += tl.histogram((key >> shift) & digit_mask, BINS, mask=match)
        if CAPTURE:  # noqa: SIM102 - a compile-time branch around a run-time one
            if count <= CAP:
                take = match.to(tl.int32)
                at = tl.atomic_add(cand_count + mat, tl.sum(take, axis=0), sem="relaxed")
                tl.store(slot + at + tl.cumsum(take, axis=0) - 1, key, mask=match)
    # Only the non-empty bins: magnitudes crowd into a few bins, so this is a few dozen
    # atomics. Relaxed: the arrival counter below orders them for the last program.
    tl.atomic_add(hist + mat * BINS + tl.arange(0, BINS), counts, mask=counts != 0, sem="relaxed")
    tl.debug_barrier()  # every thread's histogram atomics precede the release below
    arrived = tl.atomic_add(arrive + mat, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        tl.debug_barrier()  # the acquire above precedes every thread's loads of the histogram
        _select_digit(items, state, hist, status, mat, PASS, LAST_PASS, BITS)


@triton.jit
def _select_digit(items, state, hist, status, mat, PASS: tl.constexpr, LAST_PASS: tl.constexpr, BITS: tl.constexpr):
    """Fix digit PASS of matrix mat's threshold from its complete histogram."""
    BINS: tl.constexpr = 1 << BITS
    item = mat // 2
    factor = mat % 2
    dt = tl.load(items + item * ITEM_COLS + ITEM_A_DTYPE + factor).to(tl.int32)
    active = tl.load(state + mat * STATE_COLS + ST_ACTIVE)
    prefix = tl.load(state + mat * STATE_COLS + ST_PREFIX)
    rank = tl.load(state + mat * STATE_COLS + ST_RANK)
    bins = tl.arange(0, BINS)
    counts = tl.load(hist + mat * BINS + bins, cache_modifier=".cg")  # written by atomics (L2), not L1
    if PASS == 0:
        # inf/NaN keys: exponent all ones, i.e. key >= 0x7f800000 (f32), 0x7c00 (f16), 0x7f80
        # (bf16); each is a multiple of 2**(key bits - BITS), so a whole top bin range.
        first_bad = tl.where(dt == F32, 0x7F800000 >> (31 - BITS), tl.where(dt == F16, 0x7C00, 0x7F80) >> (15 - BITS))
        bad = tl.sum(tl.where(bins >= first_bad, counts, 0), axis=0) > 0
        tl.store(status + mat, bad.to(tl.int32))
        active = tl.where(bad, 0, active)
    shift, width = _digit(dt, PASS, BITS)
    cum = tl.cumsum(counts, axis=0)
    digit = tl.sum((cum < rank).to(tl.int32), axis=0)  # the first bin whose cumulative count reaches rank
    below = tl.sum(tl.where(bins < digit, counts, 0), axis=0)
    if PASS == 0:  # the keys the later passes look at: candidates (hist_kernel CAPTURE)
        tl.store(state + mat * STATE_COLS + ST_COUNT, tl.sum(tl.where(bins == digit, counts, 0), axis=0))
    on = (active != 0) & (width > 0)
    prefix = tl.where(on, prefix | (digit << shift), prefix)
    rank = tl.where(on, rank - below, rank)
    done = (shift == 0) | LAST_PASS
    active = tl.where(on & ~done, 1, 0)
    tl.store(state + mat * STATE_COLS + ST_PREFIX, prefix)
    tl.store(state + mat * STATE_COLS + ST_RANK, rank)
    tl.store(state + mat * STATE_COLS + ST_ACTIVE, active)
