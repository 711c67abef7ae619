"""Element-wise combiners over a stack ``x[T, ...]`` of task tensors with weights ``w[T]``,
PEFT's ``peft.utils.merge_utils`` formulas (the oracle), on this library's masks:
top-k masks from the exact selection kernel (:mod:`.select`), DARE masks from the
counter-based hash (:mod:`.dare`). ``x`` is in the compute dtype (float32, or float64 for
float64 input); masks are taken on ``raw`` (the stored values), which is exact.

* task_arithmetic:  sum_t w_t x_t
* magnitude_prune:  sum_t w_t topk_mask(x_t) x_t
* ties:             elect s = sign(sum_t p_t) ("total") or sign(sum_t sign(p_t)) ("frequency"),
                    p_t = topk_mask(x_t) x_t;  sum_t [sign p_t == s] w_t p_t / max(1, #agree)
* dare_linear:      sum_t w_t keep_t x_t / density       (keep_t ~ Bernoulli(density), hashed)
* dare_ties:        ties' election and disjoint mean on p_t = keep_t x_t / density
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dare
from .select import keep_masks

# The stored (unweighted) factors, when masks must be taken on them rather than on x.
Raw = Sequence[torch.Tensor] | None


def _w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def task_arithmetic(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * _w(x, w)).sum(dim=0)


def weighted_sum(xs: Sequence[torch.Tensor], w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """task_arithmetic without stacking: sum_t w_t x_t accumulated in place, inputs read once."""
    acc = xs[0].to(dtype) * float(w[0])
    for x, wt in zip(xs[1:], w[1:].tolist()):
        acc.add_(x.to(dtype), alpha=wt)
    return acc


def magnitude_prune(
    x: torch.Tensor, w: torch.Tensor, density: float, raw: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    return task_arithmetic(_topk(x, density, raw), w)


def _topk(x: torch.Tensor, density: float, raw: Sequence[torch.Tensor] | None) -> torch.Tensor:
    if density >= 1:
        return x
    masks = keep_masks(list(raw) if raw is not None else list(x), density)
    return x * torch.stack(masks).to(x.device)


def _dare(x: torch.Tensor, density: float, seed: int, names: Sequence[str]) -> torch.Tensor:
    if density >= 1:  # PEFT: no pruning and no rescale
        return x
    keep = torch.stack([dare.keep_mask(x.shape[1:], density, seed, name, x.device) for name in names])
    return x * keep / density


def disjoint_merge(p: torch.Tensor, w: torch.Tensor, majority_sign_method: str = "total") -> torch.Tensor:
    sign = p.sign()
    if majority_sign_method == "total":
        magnitude = p.sum(dim=0)
    elif majority_sign_method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    agree = sign == torch.where(magnitude >= 0, 1, -1).to(sign.dtype)
    mixed = (p * _w(p, w) * agree).sum(dim=0)
    return mixed / torch.clamp(agree.sum(dim=0), min=1.0).to(p.dtype)


def ties(
    x: torch.Tensor, w: torch.Tensor, density: float, majority_sign_method: str = "total", raw: Raw = None
) -> torch.Tensor:
    return disjoint_merge(_topk(x, density, raw), w, majority_sign_method)


def dare_linear(x: torch.Tensor, w: torch.Tensor, density: float, seed: int, names: Sequence[str]) -> torch.Tensor:
    return task_arithmetic(_dare(x, density, seed, names), w)


def dare_ties(
    x: torch.Tensor,
    w: torch.Tensor,
    density: float,
    seed: int,
    names: Sequence[str],
    majority_sign_method: str = "total",
) -> torch.Tensor:
    return disjoint_merge(_dare(x, density, seed, names), w, majority_sign_method)


def combine(
    method: str,
    x: torch.Tensor,
    w: torch.Tensor,
    density: float,
    majority_sign_method: str,
    seed: int,
    names: Sequence[str],
    raw: Raw = None,
) -> torch.Tensor:
    """Dispatch by PEFT base name (linear/svd -> task_arithmetic)."""
    if method in ("linear", "task_arithmetic", "svd"):
        return task_arithmetic(x, w)
    if method == "magnitude_prune":
        return magnitude_prune(x, w, density, raw)
    if method == "ties":
        return ties(x, w, density, majority_sign_method, raw)
    if method == "dare_linear":
        return dare_linear(x, w, density, seed, names)
    if method == "dare_ties":
        return dare_ties(x, w, density, seed, names, majority_sign_method)
    raise ValueError(f"unknown combiner {method!r}")
