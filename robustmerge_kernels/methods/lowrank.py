"""``cat`` and ``svd``: exact in dW, computed in the low-rank space (no m x n matrix).

With ``D = sum_t w_t s_t B_t A_t`` (``s_t`` the adapter's own LoRA scaling):

* cat: ``A* = [w_1 s_1 A_1; ...; w_T s_T A_T]`` (rank sum_t r_t), ``B* = [B_1 | ... | B_T]``;
  ``B* A* = D`` exactly (PEFT's layout: the weight and scaling go into A).
* svd: ``B_s = [w_1 s_1 B_1 | ...]`` (m x Tr) = Q_b R_b, ``[A_1; ...]^T`` (n x Tr) = Q_a R_a,
  core ``C = R_b R_a^T = U S V^T`` (Tr x Tr), so ``D = (Q_b U) S (Q_a V)^T`` is an exact SVD
  of D. Truncated to ``svd_rank``: ``B* = (Q_b U)[:, :r] S[:r]``, ``A* = (Q_a V)[:, :r]^T``,
  PEFT's factorisation of the truncated SVD of the dense D (``U S`` into B, ``Vh`` into A).
  QR and core SVD run in float64, so the factors are at least as accurate as a float32
  dense SVD. Rank above Tr pads with zero rows/columns (the singular values are 0).

Singular vectors are defined up to sign: each pair is flipped so that the entry of
largest magnitude of its column of B* is positive (LAPACK's dense SVD has no such rule,
so PEFT's factors may differ by signs; B* A* is the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cat(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], coef: Sequence[float], ct: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's cat: ``coef[t] = w_t * s_t`` multiplies A_t (in ``ct``)."""
    w = torch.tensor(list(coef), dtype=torch.float32).to(ct)
    A = torch.cat([x.to(ct) * w[t] for t, x in enumerate(a)], dim=0)
    B = torch.cat([x.to(ct) for x in b], dim=1)
    return A, B


def lowrank_svd(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], coef: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``sum_t coef[t] * b[t] @ a[t]``: returns (U [m,k], S [k], Vh [k,n]) in
    float64 with k = min(Tr, m, n)."""
    Bs = torch.cat([x.to(torch.float64) * float(c) for x, c in zip(b, coef)], dim=1)  # m x Tr
    As = torch.cat([x.to(torch.float64) for x in a], dim=0)  # Tr x n
    qb, rb = torch.linalg.qr(Bs)  # m x k1, k1 x Tr
    qa, ra = torch.linalg.qr(As.T)  # n x k2, k2 x Tr
    core = rb @ ra.T  # k1 x k2
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-|.| entry of u's column is positive."""
    if u.numel() == 0:
        return u, vh
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u.gather(0, idx[None, :]))[0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign[:, None]


def truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, ct: torch.dtype, clamp: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's tail of the SVD path: ``B = U[:, :r] diag(S[:r])``, ``A = Vh[:r]``, optional
    symmetric clamp at the ``clamp`` quantile of their concatenated values (in ``ct``)."""
    u, vh = fix_signs(u, vh)
    k = min(rank, s.numel())
    B = (u[:, :k] * s[:k]).to(ct)
    A = vh[:k].to(ct)
    if k < rank:  # zero singular values beyond the available rank
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    if clamp is not None:
        dist = torch.cat([B.flatten(), A.flatten()])
        hi = _quantile(dist, clamp)
        B = B.clamp(-hi, hi)
        A = A.clamp(-hi, hi)
    return A, B


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation, without its 16M-element limit."""
    if x.numel() <= 1 << 24:
        return torch.quantile(x, q)
    v = x.sort().values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return torch.lerp(v[lo], v[hi], torch.tensor(pos - lo, dtype=v.dtype))
