"""LoRA scaling per (adapter, module), as PEFT computes it when it loads the adapter.

``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA), where ``r`` and
``lora_alpha`` may be overridden per module by ``rank_pattern`` / ``alpha_pattern``.
Adapters whose scaling differs from the output's are brought to it by folding the ratio
into B (docs/ALGORITHM.md §3), so the merged adapter's delta is right under the output config.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from ..errors import AdapterError
from .keys import PEFT_PREFIX

# Config switches that change what a LoRA layer computes beyond B @ A * scaling.
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) carry magnitude vectors that RobustMerge does not define",
    "lora_bias": "adapters with a trained lora_B bias (lora_bias=true) cannot be merged as B @ A",
}


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_config(config: dict[str, Any], label: str) -> None:
    """Refuse configs whose adapters this library would merge wrongly."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # PeftType enum from LoraConfig.to_dict()
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not LORA; only LoRA adapters are merged", label)
    for flag, reason in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"unsupported: {reason}", label)
    _check_rank(config.get("r"), "r", label)
    _check_alpha(config.get("lora_alpha"), "lora_alpha", label)
    for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterError(f"{name} in adapter_config.json must be an object, got {patterns!r}", label)
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, TypeError) as exc:
                raise AdapterError(f"{name} key {key!r} is not a valid regular expression ({exc})", label) from None
            check(value, f"{name}[{key!r}]", label)


def _check_rank(value: Any, name: str, label: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{name} in adapter_config.json must be a positive integer, got {value!r}", label)


def _check_alpha(value: Any, name: str, label: str) -> None:
    """A positive, finite, normal number: an infinite or denormal alpha would make the
    scaling ratio inf or 0 and surface later as a misleading dtype overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"{name} in adapter_config.json must be a positive number, got {value!r}", label)
    if not (math.isfinite(value) and value >= sys.float_info.min):
        raise AdapterError(f"{name} in adapter_config.json must be a positive, finite, normal number, got {value!r}",
                           label)  # fmt: skip


def module_scaling(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) that PEFT uses for ``module`` (a saved-key module path)."""
    name = module.removeprefix(PEFT_PREFIX)
    r = _pattern_value(config.get("rank_pattern"), name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(alpha), float(scaling)


class ScalingRule:
    """module_scaling for one config, computed once when the config has no per-module
    patterns (the common case; planning calls this for every module of every adapter)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        patterned = config.get("rank_pattern") or config.get("alpha_pattern")
        self._constant = None if patterned else module_scaling(config, "")

    @property
    def constant(self) -> tuple[int, float, float] | None:
        """(r, lora_alpha, scaling) of every module, or None when patterns make it vary."""
        return self._constant

    def __call__(self, module: str) -> tuple[int, float, float]:
        return self._constant or module_scaling(self.config, module)
