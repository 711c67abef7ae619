"""Exact magnitude top-k masks for the baseline methods, on the CPU kernel's selection.

``keep_masks(xs, keep)`` keeps, per matrix, every entry with ``|x| >= tau`` where ``tau``
is the ``keep``-th largest magnitude: exactly the radix selection of the CPU backend
(``backends.cpu.thresholds``), or ``torch.kthvalue`` where the extension is missing, the
tensor is on a GPU or the dtype is float64 (both give the same ``tau``, bit for bit).

Difference from PEFT: ``magnitude_based_pruning`` keeps exactly ``k`` entries with
``torch.topk`` (which of several equal magnitudes survive is arbitrary); an exact
threshold keeps all entries tied with the k-th value. On tie-free data the masks agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import cpu as cpu_backend
from ..backends.tables import KERNEL_DTYPES
from ..errors import AdapterError


def keep_count(numel: int, density: float) -> int:
    """PEFT's k: ``int(density * numel)`` entries kept (density >= 1 keeps all)."""
    return numel if density >= 1 else int(density * numel)


def thresholds(xs: Sequence[torch.Tensor], ks: Sequence[int], use_kernel: bool = True) -> list[torch.Tensor]:
    """Per matrix, the ``ks[i]``-th smallest ``|x|`` (1-based) as a 0-dim tensor of x's dtype."""
    use_kernel = use_kernel and cpu_backend.extension_available()
    out: list[torch.Tensor | None] = [None] * len(xs)
    kernel = [
        i for i, x in enumerate(xs) if use_kernel and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and ks[i] >= 1
    ]
    if kernel:
        try:
            taus = cpu_backend.thresholds([xs[i] for i in kernel], [ks[i] for i in kernel])
        except ValueError as exc:
            raise AdapterError(f"contains NaN/Inf values; refusing to merge non-finite weights ({exc})") from exc
        for i, tau in zip(kernel, taus):
            out[i] = tau
    for i, x in enumerate(xs):
        if out[i] is None:
            flat = x.detach().abs().reshape(-1)
            out[i] = flat.kthvalue(ks[i]).values if ks[i] >= 1 else flat.new_zeros(())
    return out  # type: ignore[return-value]


def keep_masks(xs: Sequence[torch.Tensor], density: float, use_kernel: bool = True) -> list[torch.Tensor]:
    """Boolean masks keeping the ``int(density * numel)`` largest magnitudes (ties kept)."""
    masks: list[torch.Tensor | None] = [None] * len(xs)
    todo, ks = [], []
    for i, x in enumerate(xs):
        keep = keep_count(x.numel(), density)
        if keep >= x.numel():
            masks[i] = torch.ones_like(x, dtype=torch.bool)
        elif keep <= 0:
            masks[i] = torch.zeros_like(x, dtype=torch.bool)
        else:
            todo.append(i)
            ks.append(x.numel() - keep + 1)  # the keep-th largest is this k-th smallest
    if todo:
        taus = thresholds([xs[i] for i in todo], ks, use_kernel)
        for i, tau in zip(todo, taus):
            masks[i] = xs[i].abs() >= tau
    return masks  # type: ignore[return-value]
