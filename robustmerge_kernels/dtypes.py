"""The names users may give a floating-point dtype (``--dtype bf16``, ``dtype="float32"``)."""

from __future__ import annotations

import torch

from .errors import AdapterError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None, what: str = "output dtype") -> torch.dtype | None:
    """A torch floating-point dtype from a name or dtype (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise AdapterError(
                f"{what} {dtype} is not a floating-point type this library writes; use fp32, fp16 or bf16"
            )
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise AdapterError(f"unknown {what} {dtype!r}; use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[key]


# LoRA factors of half-precision inputs are written in float32 by default: the official
# RobustMerge merge loop (builder.py, load_and_merge_pretrained_model) promotes them to
# float32 through its float32 fusion weights, and rounding the merged factors back to
# 8 or 11 mantissa bits would throw away the accuracy of the float32 accumulation.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_factor_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Output dtype of a merged LoRA factor when ``dtype=`` is not given."""
    return torch.float32 if input_dtype in HALF_DTYPES else input_dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
