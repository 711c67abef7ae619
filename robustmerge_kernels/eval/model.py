"""Load a Hugging Face LLaVA base model and attach an adapter with peft.

The base is a ``LlavaForConditionalGeneration`` folder (with its processor), loaded with
``from_pretrained``. The adapter is a PEFT folder in either layout:

* Hugging Face LLaVA (keys under ``model.language_model.``): loaded with
  ``PeftModel.from_pretrained``.
* original LLaVA (keys ``base_model.model.model.layers...``, projector in
  ``non_lora_trainables.bin`` as ``model.mm_projector.0/2``): converted on load. LoRA keys
  are renamed into the HF layout of the loaded model, ``target_modules`` is restricted to
  the language model (the original code never adapts the vision tower, whose CLIP
  attention also has ``q_proj``/``k_proj``/``v_proj``), and the projector weights are
  copied into ``multi_modal_projector.linear_1/linear_2``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from ..adapter_io.keys import (
    HF_LM_PREFIXES,
    HF_PROJECTOR,
    ORIGINAL_LM_PREFIX,
    ORIGINAL_PROJECTOR,
    PEFT_PREFIX,
    PROJECTOR_LAYERS,
    parse_factor,
)  # fmt: skip
from ..adapter_io.names import NON_LORA_NAME
from ..adapter_io.sources import open_adapter
from ..dtypes import parse_dtype

_PROJECTOR = re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?{re.escape(ORIGINAL_PROJECTOR)}(\d+)\.(weight|bias)$")
# Original-layout language-model keys: "model." not followed by an HF sub-module name.
_HF_SUBMODULES = "|".join(re.escape(p.removeprefix("model.")) for p in (*HF_LM_PREFIXES, HF_PROJECTOR, "vision_tower."))
_ORIG_LM = re.compile(rf"^({re.escape(PEFT_PREFIX)}){re.escape(ORIGINAL_LM_PREFIX)}(?!{_HF_SUBMODULES})(.*)$")
_PROJECTOR_HF_NAME = {orig: hf for hf, orig in PROJECTOR_LAYERS.items()}  # "0" -> "linear_1"


def load_base(base: str, dtype: str = "auto", device: str = "cpu"):
    """(model, processor) from a Hugging Face LLaVA folder or hub id."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = "auto" if dtype == "auto" else parse_dtype(dtype, "model dtype")
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.padding_side = "left"  # batched generation
    return model.to(device).eval(), processor


def _language_model_prefix(model) -> str:
    """Where this transformers version puts the language model's decoder (with PEFT's
    ``base_model.model.`` in front): ``model.language_model.`` (transformers >= 4.52) or
    ``language_model.model.`` (older)."""
    for name, _ in model.named_modules():
        m = re.match(r"^(.*)layers\.0\.self_attn\.q_proj$", name)
        if m and "vision" not in name:
            return m.group(1)
    raise ValueError("cannot find the language model's decoder layers in the base model")


def is_original_layout(adapter: str) -> bool:
    if os.path.isfile(os.path.join(adapter, NON_LORA_NAME)):
        return True
    source = open_adapter(adapter, 0)
    try:
        return any(_ORIG_LM.match(k) for k in source.keys() if parse_factor(k) is not None)
    finally:
        source.close()


def convert_original_state_dict(
    state: dict[str, torch.Tensor], lm_prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an original-LLaVA adapter into (LoRA tensors renamed to the HF layout,
    projector tensors keyed ``linear_1.weight`` ...). ``lm_prefix`` is the HF name of
    the decoder's parent, e.g. ``model.language_model.``."""
    lora, projector = {}, {}
    for key, value in state.items():
        m = _PROJECTOR.match(key)
        if m:
            index = _PROJECTOR_HF_NAME.get(m.group(1))
            if index is None:
                raise ValueError(f"unexpected mm_projector layer in {key!r} (LLaVA-v1.5's is Linear-GELU-Linear)")
            projector[f"{index}.{m.group(2)}"] = value
            continue
        m = _ORIG_LM.match(key)
        lora[f"{m.group(1)}{lm_prefix}{m.group(2)}" if m else key] = value
    return lora, projector


def _load_projector(model, projector: dict[str, torch.Tensor]) -> None:
    target = next((mod for name, mod in model.named_modules() if name.endswith("multi_modal_projector")), None)
    if target is None:
        raise ValueError("the base model has no multi_modal_projector")
    own = target.state_dict()
    missing = set(own) - set(projector)
    if missing:
        raise ValueError(f"{NON_LORA_NAME} lacks projector tensors {sorted(missing)}")
    for k, v in projector.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"projector {k}: shape {tuple(v.shape)} in {NON_LORA_NAME}, {tuple(own[k].shape)} in the base"
            )
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in projector.items()})


def attach_adapter(model, adapter: str, merge: bool = True):
    """The base model with the adapter applied (merged into the weights by default)."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    if not is_original_layout(adapter):
        peft_model = PeftModel.from_pretrained(model, adapter)
    else:
        source = open_adapter(adapter, 0)
        try:
            state = {k: source.get(k) for k in source.keys()}
        finally:
            source.close()
        lm_prefix = _language_model_prefix(model)
        lora, projector = convert_original_state_dict(state, lm_prefix)
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            cfg: dict[str, Any] = json.load(f)
        cfg = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
        targets = cfg.get("target_modules")
        names = sorted({parse_factor(k).module.rsplit(".", 1)[-1] for k in lora if parse_factor(k)})
        if isinstance(targets, list) or targets is None:
            names = sorted(set(targets or names))
        cfg["target_modules"] = rf"^{re.escape(lm_prefix)}.*\.({'|'.join(map(re.escape, names))})$"
        cfg["modules_to_save"] = None
        cfg["init_lora_weights"] = False
        peft_model = get_peft_model(model, LoraConfig(**cfg))
        result = set_peft_model_state_dict(peft_model, {k: v for k, v in lora.items() if parse_factor(k)})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter tensors with no place in the base model: {unexpected[:5]}")
        if projector:
            _load_projector(peft_model, projector)
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model


def load_model(base: str, adapter: str | None = None, dtype: str = "auto", device: str = "cpu"):
    model, processor = load_base(base, dtype=dtype, device=device)
    if adapter:
        model = attach_adapter(model, adapter).to(device)
    return model.eval(), processor
