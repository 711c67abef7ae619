"""Finiteness of inputs and outputs: one cheap test, and the errors that name what failed."""

from __future__ import annotations

from typing import NoReturn

import torch

from .errors import AdapterError


def all_finite(x: torch.Tensor) -> bool:
    """True when every element is finite. A finite sum proves it (NaN and inf always
    propagate into the sum) at a fraction of isfinite()'s cost over the tensor; only a
    non-finite sum, which a huge but finite tensor can also give, needs the full scan."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def require_finite(x: torch.Tensor, adapter: str, key: str) -> None:
    """Refuse NaN/Inf input, naming the adapter and tensor with the count."""
    if not all_finite(x):
        bad = (~torch.isfinite(x)).sum().item()
        raise AdapterError(f"contains {bad} NaN/Inf values; refusing to merge non-finite weights", adapter, key)


def refuse_overflow(key: str, dtype: torch.dtype) -> NoReturn:
    """Finite inputs whose merged values do not fit the output dtype (lam * a sum of fp16
    values can): refuse, naming the output tensor."""
    raise AdapterError(
        f"merged values overflow the output dtype {dtype}; choose a wider dtype (dtype='fp32', --dtype fp32)",
        tensor=key,
    )


def check_output(key: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` when all of it is finite, else :func:`refuse_overflow`."""
    if not all_finite(x):
        refuse_overflow(key, x.dtype)
    return x
