"""An independent PCB-merging oracle (plain Python loops over tasks, NumPy float64), for
testing robustmerge_kernels/methods/pcb.py. Written from the paper's description (Du et
al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging", Sec. 3) and
checked step by step against the official code, ``PCB_merge`` in pcb-merging.py of
github.com/duguodong7/pcb-merging (commit 31fa2dc; nlp_source_code/utils/merge_utils.py
has the same body). Where the two differ, this oracle follows the official code, which
is what the library claims to implement:

1. Outlier clip (official code only; not in the paper): each task's magnitudes are
   clamped to its values at sorted positions int(d * 1e-4) and int(d * (1 - 1e-4) - 1);
   the clamped magnitudes, with the original signs, are what gets merged.
2. Intra-balancing: paper beta_intra = Softmax(N * Norm(delta * delta)) over the task's
   entries. The official code computes exp(N * Norm(|c|) ** 2): it squares after the
   min-max normalisation (the same as the paper's order only where min |c| = 0) and on
   the clipped magnitudes; this oracle follows the code. It drops the softmax's
   denominator: a positive per-task factor cancels in the per-task min-max normalisation
   of step 4 (and the quantile clip is scale-invariant), so this oracle keeps the
   paper's softmax and must still agree to rounding.
3. Inter-balancing: the paper writes beta_inter = sum_j Softmax(Norm(delta_i * delta_j));
   the official code computes tanh(delta_i * sum_j delta_j) (unclipped deltas). The
   oracle follows the official tanh form: the paper's formula is NOT what either the
   official code or pcb.py computes.
4. Drop and rescale: beta = Norm(clamp(intra * inter, q(1 - ratio), max)) per task: every
   entry at or below the value at sorted position int(d * (1 - ratio)) gets weight 0
   (so d - int(d * (1 - ratio)) - 1 entries survive, ties at the threshold dropped).
5. merged = sum_t beta_t * c_t / max(sum_t beta_t, 1e-12).

Norm is per-task min-max normalisation. A constant row (0/0: NaN in the official code)
normalises to 0 here, the convention pcb.py documents.
"""

from __future__ import annotations

import math

import numpy as np


def _at_sorted_position(values: np.ndarray, pos: int) -> float:
    ordered = sorted(float(v) for v in values)
    return ordered[max(0, min(pos, len(ordered) - 1))]


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _clamp(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # torch.clamp(x, lo, hi) = min(max(x, lo), hi)
    return np.array([min(max(float(v), lo), hi) for v in values])


def pcb_merge(tasks: np.ndarray, ratio: float) -> np.ndarray:
    """tasks: [T, d] float64 task vectors -> merged [d]."""
    tasks = np.asarray(tasks, dtype=np.float64)
    n, d = tasks.shape
    total = np.zeros(d)
    for t in range(n):
        total = total + tasks[t]
    numerator, denominator = np.zeros(d), np.zeros(d)
    for t in range(n):
        x = tasks[t]
        mag = np.abs(x)
        c_mag = _clamp(
            mag, _at_sorted_position(mag, int(d * 0.0001)), _at_sorted_position(mag, int(d * (1 - 0.0001) - 1))
        )
        c = np.sign(x) * c_mag
        z = n * _minmax(c_mag) ** 2
        e = np.exp(z - z.max())
        intra = e / e.sum()  # the paper's softmax over the task's entries
        inter = np.tanh(x * total)
        score = intra * inter
        beta = _minmax(_clamp(score, _at_sorted_position(score, int(d * (1 - ratio))), float(score.max())))
        numerator = numerator + beta * c
        denominator = denominator + beta
    return numerator / np.maximum(denominator, 1e-12)


def surviving_count(d: int, ratio: float) -> int:
    """Entries per task whose weight can be nonzero (no ties): above sorted position int(d * (1 - ratio))."""
    return d - int(d * (1 - ratio)) - 1 if not math.isclose(ratio, 0.0) else 0
