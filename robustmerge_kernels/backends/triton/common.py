"""Helpers shared by the Triton kernels: table columns, dtype codes, loads and stores.

Inputs arrive as int64 addresses in the plan tables (backends/tables.py, the schema);
a kernel turns an address into a typed pointer with ``addr.to(tl.pointer_type(...))``.
Every value is read as raw bits: the magnitude key is the bits with the sign cleared
(``& 0x7fffffff`` for float32, ``& 0x7fff`` for 16-bit types), so thresholds and masks
are decided on integers, exactly as in the C++ kernels (csrc/robustmerge/dtype.h).

Variables assigned in several branches of a runtime ``if`` have the same type in each
branch (the compiler requires it), hence the per-branch pointer names.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tables import ITEM, ITEM_COLUMNS, MODULE, MODULE_COLUMNS, OUT_DTYPES

# Column indices, taken from the schema in backends/tables.py (never written twice).
ITEM_A: tl.constexpr = tl.constexpr(ITEM["a"])
ITEM_B: tl.constexpr = tl.constexpr(ITEM["b"])
ITEM_A_DTYPE: tl.constexpr = tl.constexpr(ITEM["a_dtype"])
ITEM_B_DTYPE: tl.constexpr = tl.constexpr(ITEM["b_dtype"])
ITEM_COLS: tl.constexpr = tl.constexpr(len(ITEM_COLUMNS))

MOD_RANK: tl.constexpr = tl.constexpr(MODULE["rank"])
MOD_IN: tl.constexpr = tl.constexpr(MODULE["in_features"])
MOD_OUT: tl.constexpr = tl.constexpr(MODULE["out_features"])
MOD_FIRST: tl.constexpr = tl.constexpr(MODULE["first"])
MOD_MEMBERS: tl.constexpr = tl.constexpr(MODULE["members"])
MOD_OUT_A: tl.constexpr = tl.constexpr(MODULE["out_a"])
MOD_OUT_B: tl.constexpr = tl.constexpr(MODULE["out_b"])
MOD_OUT_DTYPE: tl.constexpr = tl.constexpr(MODULE["out_dtype"])
MOD_CLAMP_INDEX: tl.constexpr = tl.constexpr(MODULE["clamp_index"])
MOD_COLS: tl.constexpr = tl.constexpr(len(MODULE_COLUMNS))

# Per-matrix selection state (int32 [2 * n_items, STATE_COLS]); matrix 2*i is A of item i,
# 2*i + 1 its B.
ST_PREFIX: tl.constexpr = tl.constexpr(0)  # key bits fixed so far; the threshold key at the end
ST_RANK: tl.constexpr = tl.constexpr(1)  # 1-based rank of the k-th key among keys with that prefix
ST_ACTIVE: tl.constexpr = tl.constexpr(2)  # 1 while digits remain to be found
ST_NUMEL: tl.constexpr = tl.constexpr(3)
ST_COUNT: tl.constexpr = tl.constexpr(4)  # keys in pass 0's digit: the candidates of the later passes
STATE_COLS: tl.constexpr = tl.constexpr(5)

# Dtype codes (tables.OUT_DTYPES).
F32: tl.constexpr = tl.constexpr(OUT_DTYPES[torch.float32])
F16: tl.constexpr = tl.constexpr(OUT_DTYPES[torch.float16])
BF16: tl.constexpr = tl.constexpr(OUT_DTYPES[torch.bfloat16])
F64: tl.constexpr = tl.constexpr(OUT_DTYPES[torch.float64])


@triton.jit
def load_key_value(addr, dt, offs, mask):
    """Magnitude keys (int32) and values (float32, exact) of ``offs`` of the matrix at ``addr``."""
    if dt == F32:
        p32 = addr.to(tl.pointer_type(tl.int32))
        raw32 = tl.load(p32 + offs, mask=mask, other=0)
        key = raw32 & 0x7FFFFFFF
        val = raw32.to(tl.float32, bitcast=True)
    elif dt == F16:
        p16 = addr.to(tl.pointer_type(tl.int16))
        raw16 = tl.load(p16 + offs, mask=mask, other=0)
        key = raw16.to(tl.int32) & 0x7FFF
        val = raw16.to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bfloat16: the upper half of a float32
        pbf = addr.to(tl.pointer_type(tl.int16))
        rawbf = tl.load(pbf + offs, mask=mask, other=0)
        key = rawbf.to(tl.int32) & 0x7FFF
        val = ((rawbf.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return key, val


@triton.jit
def load_key(addr, dt, offs, mask):
    """Magnitude keys only (int32)."""
    if dt == F32:
        p32 = addr.to(tl.pointer_type(tl.int32))
        key = tl.load(p32 + offs, mask=mask, other=0) & 0x7FFFFFFF
    else:
        p16 = addr.to(tl.pointer_type(tl.int16))
        key = tl.load(p16 + offs, mask=mask, other=0).to(tl.int32) & 0x7FFF
    return key


@triton.jit
def load_key_full(addr, dt, offs, ALIGNED: tl.constexpr):
    """Magnitude keys (int32) of ``offs``, all inside the matrix: no mask, so contiguous
    offsets compile to 16-byte vector loads when ALIGNED (the host checked that every
    input address is a multiple of 16 bytes; ``offs`` starts at a multiple of its length)."""
    if dt == F32:
        p32 = addr.to(tl.pointer_type(tl.int32)) + offs
        if ALIGNED:
            p32 = tl.multiple_of(p32, 16)
        key = tl.load(p32) & 0x7FFFFFFF
    else:
        p16 = addr.to(tl.pointer_type(tl.int16)) + offs
        if ALIGNED:
            p16 = tl.multiple_of(p16, 16)
        key = tl.load(p16).to(tl.int32) & 0x7FFF
    return key


@triton.jit
def store_out(addr, od, offs, mask, v):
    """Store float32 ``v`` in the output dtype ``od`` (round to nearest even); returns 1 when
    some stored value is infinite (the merge overflowed the output dtype), else 0."""
    if od == F32:
        po32 = addr.to(tl.pointer_type(tl.float32))
        tl.store(po32 + offs, v, mask=mask)
        bad = (v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    elif od == F16:
        po16 = addr.to(tl.pointer_type(tl.float16))
        h = v.to(tl.float16)
        tl.store(po16 + offs, h, mask=mask)
        bad = (h.to(tl.int16, bitcast=True).to(tl.int32) & 0x7C00) == 0x7C00
    elif od == BF16:
        # Round to nearest even on the bits (inputs are finite: no NaN to preserve).
        pob = addr.to(tl.pointer_type(tl.int16))
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(pob + offs, rounded.to(tl.int16), mask=mask)
        bad = (rounded & 0x7F80) == 0x7F80
    else:
        po64 = addr.to(tl.pointer_type(tl.float64))
        tl.store(po64 + offs, v.to(tl.float64), mask=mask)
        bad = (v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    return tl.max((bad & mask).to(tl.int32), axis=0)
