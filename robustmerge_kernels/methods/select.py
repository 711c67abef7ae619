"""Exact magnitude top-k masks for the baseline methods, on the CPU kernel's selection.

``keep_masks(xs, keep)`` keeps, per matrix, every entry with ``|x| >= tau`` where ``tau``
is the ``keep``-th largest magnitude: exactly the radix selection of
csrc/robustmerge/select.h (``_cpu.thresholds``), or ``torch.kthvalue`` where the extension
is missing or the dtype is float64 (both give the same ``tau``, bit for bit).

Difference from PEFT: ``magnitude_based_pruning`` keeps exactly ``k`` entries with
``torch.topk`` (which of several equal magnitudes survive is arbitrary); an exact
threshold keeps all entries tied with the k-th value. On tie-free data the masks agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends.tables import KERNEL_DTYPES, key_to_value
from ..errors import AdapterError


def _extension():
    try:
        from .. import _cpu
    except ImportError:
        return None
    return _cpu if hasattr(_cpu, "thresholds") else None


def keep_count(numel: int, density: float) -> int:
    """PEFT's k: ``int(density * numel)`` entries kept (density >= 1 keeps all)."""
    return numel if density >= 1 else int(density * numel)


def thresholds(xs: Sequence[torch.Tensor], ks: Sequence[int], use_kernel: bool = True) -> list[torch.Tensor]:
    """Per matrix, the ``ks[i]``-th smallest ``|x|`` (1-based) as a 0-dim tensor of x's dtype."""
    ext = _extension() if use_kernel else None
    out: list[torch.Tensor | None] = [None] * len(xs)
    kernel = [i for i, x in enumerate(xs) if ext is not None and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES]
    if kernel:
        from ..backends.cpu import get_num_threads

        keep = [xs[i].contiguous() for i in kernel]
        table = torch.tensor(
            [[x.data_ptr(), KERNEL_DTYPES[x.dtype], x.numel(), ks[i]] for i, x in zip(kernel, keep)], dtype=torch.int64
        )
        keys = torch.zeros(len(kernel), dtype=torch.int32)
        status = torch.zeros(len(kernel), dtype=torch.int32)
        ok = ext.thresholds(table.data_ptr(), len(kernel), get_num_threads(), keys.data_ptr(), status.data_ptr())
        if not ok:
            raise AdapterError("contains NaN/Inf values; refusing to merge non-finite weights")
        for i, x, key in zip(kernel, keep, (keys.to(torch.int64) & 0xFFFFFFFF).tolist()):
            out[i] = key_to_value(key, x.dtype).to(x.device)
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
