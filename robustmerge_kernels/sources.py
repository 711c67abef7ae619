"""Adapters as the merge sees them: a label, a LoRA config and lazily read tensors.

Whatever the user hands to ``merge()`` (a PEFT folder, a state dict, a
``(state_dict, config)`` pair, a live ``PeftModel``) becomes an :class:`AdapterSource`.
Safetensors files are memory-mapped and read one tensor at a time, so planning a merge
touches only headers and merging holds one module's inputs at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


@dataclass
class AdapterSource:
    """One input adapter. ``label`` is how errors and summaries name it."""

    label: str
    config: dict[str, Any] | None
    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]
    _loader: Any  # callable key -> tensor
    path: str | None = None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._loader(key)
        except AdapterError:
            raise
        except Exception as exc:  # corrupt or truncated data surfaces here
            raise AdapterError(f"cannot read tensor data ({exc})", self.label, key) from exc


def _read_config(folder: str, label: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"missing {CONFIG_NAME} in {folder!r}; not a PEFT adapter folder", label)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot parse {CONFIG_NAME}: {exc}", label) from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} is not a JSON object", label)
    return config


def _open_safetensors(path: str, label: str) -> AdapterSource:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="pt")
        keys = list(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: _safetensors_dtype(handle.get_slice(k).get_dtype(), label, k) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt or unreadable safetensors file {path!r}: {exc}", label) from exc
    return AdapterSource(label, None, shapes, dtypes, handle.get_tensor, path=path)


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _safetensors_dtype(name: str, label: str, key: str) -> torch.dtype:
    dtype = _ST_DTYPES.get(name)
    if dtype is None:
        raise AdapterError(f"dtype {name} is not a floating-point type this library merges", label, key)
    return dtype


def _from_state_dict(state_dict: Mapping[str, Any], config: dict | None, label: str) -> AdapterSource:
    if not isinstance(state_dict, Mapping):
        raise AdapterError(f"expected a state dict (mapping of str to tensor), got {type(state_dict).__name__}", label)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise AdapterError(f"state dict key {key!r} is not a string", label)
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"value is a {type(value).__name__}, not a tensor", label, key)
        tensors[key] = value.detach()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: v.dtype for k, v in tensors.items()}
    return AdapterSource(label, config, shapes, dtypes, tensors.__getitem__)


def _load_bin(path: str, label: str) -> Mapping[str, Any]:
    """torch.load a .bin adapter, memory-mapped (paged in as the merge reads it) when the
    file is in the zip format; the legacy pre-1.6 format cannot be mapped and loads whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"cannot load {path!r}: {exc}", label) from exc


def _config_to_dict(config: Any, label: str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise AdapterError(f"config must be a dict or a LoraConfig, got {type(config).__name__}", label)


def open_adapter(obj: Any, index: int) -> AdapterSource:
    """Turn one user input into an AdapterSource (the index names it in errors)."""
    if isinstance(obj, (str, os.PathLike)):
        folder = os.fspath(obj)
        label = f"#{index} ({folder})"
        if not os.path.isdir(folder):
            raise AdapterError(f"no such adapter folder {folder!r}", label)
        config = _read_config(folder, label)
        st_path = os.path.join(folder, SAFETENSORS_NAME)
        bin_path = os.path.join(folder, BIN_NAME)
        if os.path.isfile(st_path):
            source = _open_safetensors(st_path, label)
        elif os.path.isfile(bin_path):
            state = _load_bin(bin_path, label)
            source = _from_state_dict(state, None, label)
            source.path = bin_path
        else:
            raise AdapterError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {folder!r}", label)
        source.config = config
        return source
    label = f"#{index}"
    if hasattr(obj, "peft_config") and hasattr(obj, "state_dict"):  # a live PeftModel
        from peft import get_peft_model_state_dict

        name = getattr(obj, "active_adapter", "default")
        if not isinstance(name, str):
            name = name[0]
        return _from_state_dict(
            get_peft_model_state_dict(obj, adapter_name=name), _config_to_dict(obj.peft_config[name], label), label
        )
    if isinstance(obj, tuple) and len(obj) == 2:
        return _from_state_dict(obj[0], _config_to_dict(obj[1], label), label)
    if isinstance(obj, Mapping):
        return _from_state_dict(obj, None, label)
    raise AdapterError(
        f"cannot read an adapter from a {type(obj).__name__}; pass a PEFT folder, a state dict, "
        "a (state_dict, config) pair or a PeftModel",
        label,
    )
