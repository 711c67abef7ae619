"""An independent, deliberately naive transcription of docs/ALGORITHM.md §3 (RobustMerge).

Used only by the tests as the oracle for ``robustmerge_kernels.reference``. It imports
nothing from the package and avoids the reference's building blocks on purpose:

  * no ``torch.kthvalue`` (the threshold comes from Python's ``sorted``),
  * no vectorised reductions (plain Python loops per task / per row / per element),
  * every sum is ``math.fsum`` over Python floats, i.e. the correctly rounded float64
    value of the exact sum.

Converting a float16 / bfloat16 / float32 / float64 value to a Python float is exact, and
``abs`` is exact, so thresholds and masks computed on the Python floats are the ones "on
the values as stored in the input dtype" that docs/ALGORITHM.md §3 (Numerics) asks for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _rows(x: torch.Tensor) -> list[list[float]]:
    """A 2-D tensor as nested Python floats (exact for every floating dtype)."""
    assert x.dim() == 2, x.shape
    return x.detach().cpu().to(torch.float64).tolist()


def prune_k(numel: int, density: float) -> int:
    # docs/ALGORITHM.md §3 step 1: k = floor(N * (1 - density)), computed as Python int(...) in float64.
    return int(numel * (1 - density))


def magnitude_mask(x: torch.Tensor, density: float) -> list[list[bool]]:
    """docs/ALGORITHM.md §3 step 1 for one matrix: keep |x| >= tau, tau = k-th smallest |x| (1-based)."""
    rows = _rows(x)
    n_rows, n_cols = len(rows), len(rows[0])
    k = prune_k(n_rows * n_cols, density)
    if k < 1:
        return [[True] * n_cols for _ in range(n_rows)]
    mags = sorted(abs(v) for row in rows for v in row)
    tau = mags[k - 1]
    return [[abs(v) >= tau for v in row] for row in rows]


def row_scales(a: torch.Tensor, mask: list[list[bool]], clamp_quantile: float) -> list[float]:
    """docs/ALGORITHM.md §3 steps 2-3 for one task's A [r, n]."""
    rows = _rows(a)
    s = []
    for row, mrow in zip(rows, mask):
        total = math.fsum(abs(v) for v in row)
        kept = math.fsum(abs(v) for v, keep in zip(row, mrow) if keep)
        s.append(total / kept if kept != 0.0 else 1.0)
    r = len(s)
    lo = sorted(s)[min(int(r * clamp_quantile), r - 1)]
    return [max(v, lo) for v in s]


@dataclass
class OracleResult:
    a: torch.Tensor  # [r, n] float64
    b: torch.Tensor  # [m, r] float64
    mask_a: torch.Tensor  # [T, r, n] bool
    mask_b: torch.Tensor  # [T, m, r] bool
    scales: torch.Tensor  # [T, r] float64


def robustmerge(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    density: float,
    clamp_quantile: float,
    lam: float,
    b_scale: Sequence[float] | None = None,
    masks_b: Sequence[list[list[bool]]] | None = None,
) -> OracleResult:
    """docs/ALGORITHM.md §3 for one module, everything in float64.

    ``b_scale[t]`` multiplies task t's B *after* its mask has been taken (on the unscaled,
    stored values; pruning is scale-invariant). ``masks_b`` overrides the B masks (used to
    evaluate the formula on pre-scaled B with the masks of the unscaled B).
    """
    T = len(a_list)
    assert T == len(b_list) >= 1
    if b_scale is None:
        b_scale = [1.0] * T
    masks_a = [magnitude_mask(a, density) for a in a_list]
    if masks_b is None:
        masks_b = [magnitude_mask(b, density) for b in b_list]
    scales = [row_scales(a, ma, clamp_quantile) for a, ma in zip(a_list, masks_a)]

    a_rows = [_rows(a) for a in a_list]
    b_rows = [_rows(b) for b in b_list]
    r, n = len(a_rows[0]), len(a_rows[0][0])
    m = len(b_rows[0])

    merged_a = [[0.0] * n for _ in range(r)]
    for i in range(r):
        for j in range(n):
            merged_a[i][j] = lam * math.fsum(a_rows[t][i][j] for t in range(T) if masks_a[t][i][j])

    merged_b = [[0.0] * r for _ in range(m)]
    for i in range(r):
        denom = math.fsum(scales[t][i] for t in range(T))
        for p in range(m):
            num = math.fsum(scales[t][i] * (b_scale[t] * b_rows[t][p][i]) for t in range(T) if masks_b[t][p][i])
            merged_b[p][i] = lam * num / denom

    return OracleResult(
        a=torch.tensor(merged_a, dtype=torch.float64).reshape(r, n),
        b=torch.tensor(merged_b, dtype=torch.float64).reshape(m, r),
        mask_a=torch.tensor(masks_a, dtype=torch.bool).reshape(T, r, n),
        mask_b=torch.tensor(masks_b, dtype=torch.bool).reshape(T, m, r),
        scales=torch.tensor(scales, dtype=torch.float64).reshape(T, r),
    )


def mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """docs/ALGORITHM.md §3 step 5: element-wise mean (float64)."""
    flat = [t.detach().cpu().to(torch.float64).reshape(-1).tolist() for t in tensors]
    out = [math.fsum(vals) / len(vals) for vals in zip(*flat)]
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)
