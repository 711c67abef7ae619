"""PCB-merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing"), applied to the
stacked task tensors ``x[T, d]`` (here each adapter's weighted lora_A, and separately its
lora_B, flattened), following the official ``PCB_merge``:

    c_t   = sign(x_t) * clip(|x_t|, q_t(1e-4), q_t(1 - 1e-4))          (per-task outlier clip)
    intra = exp(T * norm_t(|c_t|)^2)                                    (intra-balancing)
    inter = tanh(x_t * sum_u x_u)                                       (inter-balancing)
    beta  = norm_t(clip(intra * inter, q_t(1 - pcb_ratio), max_t))     (drop all but the top ratio)
    merged = sum_t beta_t c_t / max(sum_t beta_t, 1e-12)

``norm_t`` is per-task min-max normalisation (a constant row normalises to 0 instead of
the official 0/0 = NaN); ``q_t(p)`` is the value at sorted position ``int(d * p)``,
taken exactly with ``torch.kthvalue``.
"""

from __future__ import annotations

import torch


def _order_stat(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Per row, the value at 0-based sorted position ``pos`` (= sort(x)[:, pos])."""
    pos = max(0, min(pos, x.shape[1] - 1))
    return x.kthvalue(pos + 1, dim=1, keepdim=True).values


def _clip(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    d = x.shape[1]
    lo = _order_stat(x, int(d * min_ratio))
    hi = _order_stat(x, int(d * (1 - max_ratio) - 1))
    return torch.maximum(torch.minimum(x, hi), lo)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_merge(x: torch.Tensor, pcb_ratio: float = 0.1) -> torch.Tensor:
    """Merge ``x[T, ...]`` (compute dtype) into one tensor of shape ``x.shape[1:]``."""
    shape = x.shape[1:]
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[0]
    mag = _clip(flat.abs(), 1e-4, 1e-4)
    clipped = torch.sign(flat) * mag
    intra = torch.exp(n * _normalize(mag) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    beta = _normalize(_clip(intra * inter, 1 - pcb_ratio, 0))
    merged = (clipped * beta).sum(dim=0) / torch.clamp(beta.sum(dim=0), min=1e-12)
    return merged.reshape(shape)
