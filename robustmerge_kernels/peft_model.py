"""Merging adapters a PeftModel already holds, as PEFT's ``add_weighted_adapter`` does.

``add_merged_adapter(model, ["a", "b"], "ab")`` merges the named adapters with any method of
:func:`robustmerge_kernels.merge` and adds the result to the model as adapter ``"ab"``; PEFT's
option names (``adapters``, ``adapter_name``, ``combination_type``, ``weights``, ``density``,
``majority_sign_method``, ``svd_rank``, ``svd_clamp``) are accepted too, so a call written
for PEFT needs only its function name changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .api import MergedAdapter, merge
from .errors import AdapterError

# PEFT's add_weighted_adapter options that do not change the result (see README).
_IGNORED_PEFT_OPTIONS = ("svd_full_matrices", "svd_driver")


def add_merged_adapter(
    model: Any,
    adapter_names: Sequence[str] | None = None,
    new_name: str | None = None,
    method: str = "robustmerge",
    **options: Any,
) -> MergedAdapter:
    """Merge ``adapter_names`` of ``model`` (a PeftModel) into a new adapter ``new_name`` of it.

    Returns the merged state dict (with ``.config`` and ``.report``); ``model.set_adapter(new_name)``
    then computes with it. ``options`` are :func:`robustmerge_kernels.merge`'s (``density``,
    ``lam``, ``weights``, ...).
    """
    from peft import LoraConfig, set_peft_model_state_dict

    adapter_names = _alias(options, "adapters", adapter_names, "adapter_names")
    new_name = _alias(options, "adapter_name", new_name, "new_name")
    method = _alias(options, "combination_type", method if method != "robustmerge" else None, "method") or method
    for name in _IGNORED_PEFT_OPTIONS:
        options.pop(name, None)
    if not new_name or not isinstance(new_name, str):
        raise AdapterError(f"new_name must name the adapter to add, got {new_name!r}")
    if new_name in getattr(model, "peft_config", {}):
        raise AdapterError(f"the model already has an adapter {new_name!r}; choose another new_name")
    if "out" in options:
        raise AdapterError("add_merged_adapter adds to the model; use merge(..., out=) to write a folder")
    merged = merge(model, method=method, adapter_names=adapter_names, **options)
    config = {k: v for k, v in merged.config.items() if k in LoraConfig.__dataclass_fields__}
    config["inference_mode"] = getattr(model.peft_config[adapter_names[0]], "inference_mode", False)
    model.add_adapter(new_name, LoraConfig(**config))
    result = set_peft_model_state_dict(model, dict(merged), adapter_name=new_name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{new_name}." in k and "lora_" in k]
    if missing:
        raise AdapterError(
            f"the merged adapter left {len(missing)} LoRA tensors of {new_name!r} unset, e.g. {missing[0]}"
        )
    return merged


def _alias(options: dict[str, Any], peft_name: str, value: Any, ours: str) -> Any:
    """PEFT's spelling of an option, unless ours is given too (then both is an error)."""
    if peft_name not in options:
        return value
    given = options.pop(peft_name)
    if value is not None and value != given:
        raise AdapterError(f"{ours} and PEFT's {peft_name} disagree ({value!r} vs {given!r}); give one")
    return given
