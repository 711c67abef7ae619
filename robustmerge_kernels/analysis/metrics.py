"""The analysis metrics of one module, computed exactly in the low-rank space.

A LoRA delta ``dW = c * B @ A`` (``B`` m x r, ``A`` r x n, ``c`` the LoRA scaling) has rank
at most r, so everything below works on m x r and n x r bases and r x r cores: the thin
SVD comes from a QR of each factor and an SVD of the small core
(:func:`robustmerge_kernels.methods.lowrank.lowrank_svd`), never from the dense m x n
matrix. All arithmetic is float64. Definitions (also in README.md, "Analysing adapters and merges"):

* spectrum: the singular values ``s_1 >= ... >= s_k`` of ``dW`` (k = min(r, m, n));
  ``head_tail_gap`` = mean of the top ``top_k`` values / mean of the others,
  ``energy_top`` = share of ``||dW||_F^2`` in the top ``top_k``.
* interference of tasks i, j: ``cosine`` = <dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F), and the
  ``overlap`` of their top-``top_k`` left (output) and right (input) singular subspaces,
  ``||U_i^T U_j||_F^2 / top_k`` (mean squared cosine of the principal angles, in [0, 1]).
* merged delta M against task t, per singular index i (``u_i``, ``s_i``, ``v_i`` of dW_t):
  ``direction_i`` = |cos(u_i, M v_i)| = |u_i^T M v_i| / ||M v_i|| (does the input
  direction v_i still come out along u_i?), ``retention_i`` = u_i^T M v_i / s_i (how much of
  the singular value survives along that rank-one direction; signed: < 0 is a reversal),
  and ``coefficient`` = <M, dW_t>_F / ||dW_t||_F^2 = sum_i s_i u_i^T M v_i / sum_i s_i^2.

Singular vectors are defined up to a common sign of (u_i, v_i); every metric above is
invariant under it. Indices whose singular value is zero (numerically: below
``max(m, n) * eps * s_1``) have no defined direction and are reported as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64
_EPS = torch.finfo(F64).eps


@dataclass(frozen=True)
class TaskSVD:
    """Thin SVD of one task's delta: ``dW = u @ diag(s) @ v.T`` (u m x k, v n x k)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    valid: int  # number of leading singular values that are numerically non-zero

    @property
    def frobenius(self) -> float:
        return float(self.s.square().sum().sqrt())


def task_svd(a: torch.Tensor, b: torch.Tensor, scale: float) -> TaskSVD:
    """Exact thin SVD of ``scale * b @ a`` in float64, from QR factors and an r x r core.

    The steps of :func:`robustmerge_kernels.methods.lowrank.lowrank_svd` for one task,
    without its concatenation copies (this runs once per task and module).
    """
    qb, rb = torch.linalg.qr(b.to(F64))  # m x k1, k1 x r
    qa, ra = torch.linalg.qr(a.to(F64).T)  # n x k2, k2 x r
    uc, s, vch = torch.linalg.svd((rb @ ra.T) * float(scale), full_matrices=False)
    m, n = b.shape[0], a.shape[1]
    cut = max(m, n) * _EPS * (float(s[0]) if s.numel() else 0.0)
    valid = int((s > cut).sum()) if s.numel() and float(s[0]) > 0 else 0
    return TaskSVD(qb @ uc, s, qa @ vch.T, valid)


def _head(valid: int, top_k: int) -> int:
    return min(top_k, valid)


def spectrum_stats(svd: TaskSVD, top_k: int) -> dict:
    """Singular values, head/tail gap and energy share of the top ``top_k``."""
    s = svd.s[: svd.valid]
    k = _head(svd.valid, top_k)
    out = {"singular_values": [float(x) for x in svd.s], "rank": svd.valid, "frobenius": svd.frobenius}
    if svd.valid == 0:
        out.update(head_tail_gap=None, energy_top=None, condition=None)
        return out
    total = float(s.square().sum())
    out["energy_top"] = float(s[:k].square().sum()) / total
    out["head_tail_gap"] = float(s[:k].mean() / s[k:].mean()) if k < svd.valid else None
    out["condition"] = float(s[0] / s[-1])
    return out


def interference(svds: Sequence[TaskSVD], top_k: int) -> dict[str, list[list[float]]]:
    """Pairwise cosine (and inner product) of the deltas and overlap of their top singular subspaces.

    ``<dW_i, dW_j>_F = sum_ab s_ia s_jb (U_i^T U_j)_ab (V_i^T V_j)_ab``: one Gram matrix of
    the left bases and one of the right bases per pair (k x k each) give the pair's inner
    product and subspace overlap at once.
    """
    T = len(svds)
    norms = [x.frobenius for x in svds]
    cos = [[0.0] * T for _ in range(T)]
    left = [[0.0] * T for _ in range(T)]
    right = [[0.0] * T for _ in range(T)]
    inners = [[0.0] * T for _ in range(T)]
    for i in range(T):
        si, ki = svds[i].s, _head(svds[i].valid, top_k)
        for j in range(i, T):
            sj, kj = svds[j].s, _head(svds[j].valid, top_k)
            bu = svds[i].u.T @ svds[j].u
            bv = svds[i].v.T @ svds[j].v
            inner = float((si[:, None] * sj[None, :] * bu * bv).sum())
            c = inner / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else 0.0
            k = min(ki, kj)
            lo = float(bu[:ki, :kj].square().sum()) / k if k else 0.0
            ro = float(bv[:ki, :kj].square().sum()) / k if k else 0.0
            inners[i][j] = inners[j][i] = inner
            cos[i][j] = cos[j][i] = c
            left[i][j] = left[j][i] = lo
            right[i][j] = right[j][i] = ro
    return {"cosine": cos, "overlap_left": left, "overlap_right": right, "inner": inners}


def merged_metrics(svd: TaskSVD, a_m: torch.Tensor, b_m: torch.Tensor, scale_m: float) -> dict:
    """Directional similarity and singular value retention of merged ``M = scale_m * b_m @ a_m``
    along each singular pair of one task, plus the projection coefficient <M, dW>/||dW||^2."""
    k = svd.s.numel()
    if svd.valid == 0:
        return {"direction": [None] * k, "retention": [None] * k, "inner": 0.0, "coefficient": None}
    mv = (b_m.to(F64) @ (a_m.to(F64) @ svd.v)) * float(
        scale_m
    )  # .to is free for float64 inputs  # M v_i, m x k (rank of M inside)
    proj = (svd.u * mv).sum(dim=0)  # u_i^T M v_i
    norm = mv.norm(dim=0)
    direction: list[float | None] = []
    retention: list[float | None] = []
    for i in range(k):
        if i >= svd.valid:
            direction.append(None)
            retention.append(None)
            continue
        direction.append(float(proj[i].abs() / norm[i]) if float(norm[i]) > 0 else 0.0)
        retention.append(float(proj[i] / svd.s[i]))
    s = svd.s[: svd.valid]
    inner = float((s * proj[: svd.valid]).sum())
    return {
        "direction": direction,
        "retention": retention,
        "inner": inner,
        "coefficient": inner / float(s.square().sum()),
    }
