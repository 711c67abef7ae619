"""Plain PyTorch RobustMerge, exactly as docs/ALGORITHM.md §3 defines it.

This is the oracle every kernel backend is tested against, so it favours being obviously
right over being fast: one module at a time, vectorised over the adapters (tasks) that
carry it.

Numerics, chosen once and shared by every backend:
  * Masks are computed on the stored values. float16/bfloat16 values are widened to
    float32 first, which is exact, so ``|x|``, the k-th value and ``|x| >= tau`` are the
    same as in the input dtype.
  * Pruning is scale-invariant, so the ratio that brings an adapter to the output scaling
    (``b_scale``) multiplies the *kept* B values; masks never depend on it.
  * Sums of the merged factors are float32 (float64 for float64 input); row sums and
    means are float64. The result is cast to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .params import RobustMergeParams


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def prune_count(numel: int, density: float) -> int:
    """k of step 1: how many of ``numel`` entries fall below the threshold (Python float64)."""
    return int(numel * (1.0 - density))


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Step 1 for a stack ``x[T, ...]``: per leading index, keep ``|x| >= kthvalue(|x|, k)``."""
    flat = x.abs().reshape(x.shape[0], -1)
    k = prune_count(flat.shape[1], density)
    if k < 1:
        return torch.ones_like(x, dtype=torch.bool)
    tau = torch.kthvalue(flat, k, dim=1).values
    return (flat >= tau[:, None]).reshape(x.shape)


def row_scales(a: torch.Tensor, mask_a: torch.Tensor, clamp_quantile: float) -> torch.Tensor:
    """Steps 2-3 for ``a[T, r, n]``: per task, row-sum ratio then the lower quantile clamp.

    Row sums are float64: a row of float32 values near the maximum would overflow a
    float32 sum and turn the scale into inf/inf = NaN. Returns float64 scales [T, r].
    """
    mag = a.abs().to(torch.float64)
    total = mag.sum(dim=2)
    kept = (mag * mask_a).sum(dim=2)
    # A row whose kept mass is zero has nothing to compensate (official code: inf/NaN).
    s = torch.where(kept > 0, total / kept, torch.ones_like(total))
    r = a.shape[1]
    lo = s.sort(dim=1).values[:, min(int(r * clamp_quantile), r - 1)]
    return torch.maximum(s, lo[:, None])


@dataclass
class ModuleResult:
    a: torch.Tensor  # merged A [r, n]
    b: torch.Tensor  # merged B [m, r]
    mask_a: torch.Tensor  # [T, r, n] bool
    mask_b: torch.Tensor  # [T, m, r] bool
    scales: torch.Tensor  # [T, r] A-row scales after the clamp


def robustmerge_module(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    params: RobustMergeParams,
    b_scale: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> ModuleResult:
    """Merge one module: ``a_list[t]`` is ``A_t [r, n]``, ``b_list[t]`` is ``B_t [m, r]``."""
    ct = compute_dtype(*(x.dtype for x in (*a_list, *b_list)))
    a = torch.stack([x.to(ct) for x in a_list])
    b = torch.stack([x.to(ct) for x in b_list])
    mask_a = magnitude_mask(a, params.density)
    mask_b = magnitude_mask(b, params.density)
    s = row_scales(a, mask_a, params.clamp_quantile)  # [T, r]
    if b_scale is not None:
        b = b * torch.tensor(b_scale, dtype=ct, device=b.device)[:, None, None]
    a_kept = a * mask_a
    b_kept = b * mask_b
    merged_a = params.lam * a_kept.sum(dim=0)
    # sum_t s_t B_t / sum_t s_t, with the normalised weights w_t = s_t / sum_t s_t in [0, 1]
    # formed first (in float64), so large B values cannot overflow through s_t * B_t.
    w = (s / s.sum(dim=0)).to(ct)
    merged_b = params.lam * (b_kept * w[:, None, :]).sum(dim=0)
    out_dtype = out_dtype or a_list[0].dtype
    return ModuleResult(merged_a.to(out_dtype), merged_b.to(out_dtype), mask_a, mask_b, s)


def mean_tensors(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """docs/ALGORITHM.md §3 step 5: element-wise mean of non-LoRA tensors, summed in a fixed order.

    The sum is float64 so that the mean of values near a dtype's maximum cannot overflow.
    """
    acc = tensors[0].to(torch.float64, copy=True)
    for x in tensors[1:]:
        acc += x.to(torch.float64)
    return (acc / len(tensors)).to(out_dtype or tensors[0].dtype)


def mean_tensors_streaming(
    read_rows: Sequence, shape: tuple[int, ...], out_dtype: torch.dtype, chunk_elems: int = 1 << 20
) -> torch.Tensor:
    """mean_tensors, bit for bit, holding one chunk of rows per step instead of every input.

    ``read_rows[t](start, stop)`` returns rows ``start:stop`` (first dimension) of adapter
    t's tensor. Each chunk is summed in float64 in adapter order and divided once, exactly
    as mean_tensors does element by element, so memory is the output plus one float64
    chunk, whatever the number of adapters.
    """
    if not shape:  # a scalar: nothing to chunk
        return mean_tensors([r(None, None) for r in read_rows], out_dtype)
    per_row = math.prod(shape[1:])
    step = max(1, chunk_elems // max(per_row, 1))
    out = None
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        acc = read_rows[0](start, stop).to(torch.float64, copy=True)
        for read in read_rows[1:]:
            acc += read(start, stop).to(torch.float64)
        part = (acc / len(read_rows)).to(out_dtype)
        if out is None:
            out = torch.empty(shape, dtype=out_dtype, device=part.device)
        out[start:stop] = part
        del acc, part
    return out if out is not None else torch.empty(shape, dtype=out_dtype)
