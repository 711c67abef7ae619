"""Tiny PEFT adapter folders written directly (no training), for file-level tests."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}


def tiny_tensors(seed: int, r: int = 2, n: int = 6, m: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = "base_model.model.layers.0.q"
    return {f"{p}.lora_A.weight": torch.randn(r, n, generator=g), f"{p}.lora_B.weight": torch.randn(m, r, generator=g)}


def tiny_folder(path, seed: int = 0, tensors=None, config=None) -> str:
    """A PEFT folder with adapter_config.json and adapter_model.safetensors."""
    os.makedirs(path, exist_ok=True)
    save_file(tensors if tensors is not None else tiny_tensors(seed), os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config or CONFIG, f)
    return str(path)


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header written verbatim (for hostile headers)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data
