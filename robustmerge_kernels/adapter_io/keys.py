"""Classify the keys of a PEFT LoRA state dict.

A key is one of:
  * a LoRA factor: ``<module>.lora_A[.<adapter>].weight`` (also ``lora_B``, and the
    embedding variants ``lora_embedding_A/B`` that PEFT stores without ``.weight``);
  * an unsupported LoRA variant (DoRA magnitude, LoRA bias, ...): refused, because
    averaging it would silently produce a wrong adapter;
  * anything else (``modules_to_save`` copies, a multimodal projector, biases): merged
    by element-wise mean (docs/ALGORITHM.md §3 step 5).

The adapter name inside a key (``lora_A.default.weight`` in a live model's state dict) is
dropped: output keys use the saved-adapter form that ``PeftModel.from_pretrained`` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Every function below that maps a key string to a result is pure (string in, immutable
# value out), and a merge of T adapters asks the same key strings T times, merge after
# merge: they are memoised. Shapes and dtypes are never part of these results, so a key
# reused with another shape or dtype is re-checked by the plan (plan.py) as before.
_KEY_CACHE = 1 << 16  # distinct key strings remembered (a few MB at most)

# module, factor, optional adapter name, optional ".weight"
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<factor>lora_(?:embedding_)?[AB])"
    r"(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$"
)
# Any other tensor that belongs to a LoRA layer: DoRA magnitudes, lora_B.bias, ...
_LORA_OTHER = re.compile(r"\.(lora_[A-Za-z_]+)(\.|$)")


@dataclass(frozen=True)
class FactorKey:
    module: str  # e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    factor: str  # "A" or "B"
    embedding: bool  # lora_embedding_A/B (stored without ".weight")

    def saved_key(self) -> str:
        """The key under which PEFT saves (and loads) this factor."""
        if self.embedding:
            return f"{self.module}.lora_embedding_{self.factor}"
        return f"{self.module}.lora_{self.factor}.weight"


_SAVED_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


@lru_cache(maxsize=_KEY_CACHE)
def parse_factor(key: str) -> FactorKey | None:
    """Return the LoRA factor a key holds, or None when it is not a LoRA A/B factor."""
    suffix = key[-14:]  # the common saved form, without a regular expression (planning hot path)
    if suffix in _SAVED_SUFFIXES and len(key) > 14:
        return FactorKey(module=key[:-14], factor=_SAVED_SUFFIXES[suffix], embedding=False)
    m = _FACTOR.match(key)
    if m is None:
        return None
    factor = m.group("factor")
    if "embedding" not in factor and not key.endswith(".weight"):
        return None  # lora_B.bias (or lora_A.<name> without a weight): not a factor
    return FactorKey(module=m.group("module"), factor=factor[-1], embedding="embedding" in factor)


@lru_cache(maxsize=_KEY_CACHE)
def unsupported_lora_part(key: str) -> str | None:
    """Name of the LoRA part for keys that are LoRA but not an A/B factor (None otherwise)."""
    if parse_factor(key) is not None:
        return None
    m = _LORA_OTHER.search(key)
    if m is None:
        return None
    if key.endswith(".bias") and m.group(1) in ("lora_A", "lora_B"):
        return f"{m.group(1)} bias"  # lora_bias=true adapters: a trained bias, not a duplicate factor
    return m.group(1)


# PEFT saves every key of a model's adapter under this prefix.
PEFT_PREFIX = "base_model.model."

# LLaVA checkpoints name the same weights differently: the original LLaVA code, and
# Hugging Face's LlavaForConditionalGeneration before and after transformers moved the
# language model under model.language_model. This is the one table of those layouts;
# adapters are paired by a canonical name (the original layout), so adapters saved from
# either code base merge together, and eval/model.py converts with the same table.
ORIGINAL_LM_PREFIX = "model."  # original LLaVA: decoder layers at model.layers
HF_LM_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers >= 4.52, older
ORIGINAL_PROJECTOR = "model.mm_projector."  # original LLaVA: mm_projector.0 / .2 (Linear-GELU-Linear)
HF_PROJECTOR = "multi_modal_projector."
PROJECTOR_LAYERS = {"linear_1": "0", "linear_2": "2"}  # HF layer name -> original index

_LAYOUT_REWRITES = tuple(  # applied at the start of the name below PEFT's prefix
    [(re.compile(f"^{re.escape(p)}"), ORIGINAL_LM_PREFIX) for p in HF_LM_PREFIXES]
    + [
        (re.compile(rf"^(?:model\.)?{re.escape(HF_PROJECTOR + hf)}\."), f"{ORIGINAL_PROJECTOR}{orig}.")
        for hf, orig in PROJECTOR_LAYERS.items()
    ]
)


@lru_cache(maxsize=_KEY_CACHE)
def canonical_name(name: str) -> str:
    """The original-LLaVA spelling of a module or tensor name (other names unchanged)."""
    prefix = PEFT_PREFIX if name.startswith(PEFT_PREFIX) else ""
    rest = name[len(prefix) :] + "."
    for pattern, repl in _LAYOUT_REWRITES:
        rest = pattern.sub(repl, rest, count=1)
    return prefix + rest[:-1]


# The same table, read the other way: the output of a merge is spelled in one layout
# (the first adapter's), whichever layouts its inputs came in. Per layout: the prefix of
# the decoder's children and of the projector's layers.
ORIGINAL_LAYOUT, HF_LAYOUT, HF_LEGACY_LAYOUT = "original", "hf", "hf_legacy"
_LM_PREFIX = {ORIGINAL_LAYOUT: ORIGINAL_LM_PREFIX, HF_LAYOUT: HF_LM_PREFIXES[0], HF_LEGACY_LAYOUT: HF_LM_PREFIXES[1]}
_PROJECTOR_PREFIX = {
    ORIGINAL_LAYOUT: ORIGINAL_PROJECTOR,
    HF_LAYOUT: f"model.{HF_PROJECTOR}",
    HF_LEGACY_LAYOUT: HF_PROJECTOR,
}
_ORIGINAL_INDEX = {orig: hf for hf, orig in PROJECTOR_LAYERS.items()}  # "0" -> "linear_1"
# Children of the decoder (LlamaModel) that the layouts place differently; other names
# under a prefix (the vision tower, which original LLaVA also keeps under model.) are not
# layout names and are written as the first adapter that has them spells them.
LM_CHILDREN = ("layers.", "embed_tokens.", "norm.")


def _split(name: str) -> tuple[str, str]:
    prefix = PEFT_PREFIX if name.startswith(PEFT_PREFIX) else ""
    return prefix, name[len(prefix) :] + "."


@lru_cache(maxsize=_KEY_CACHE)
def layout_of(name: str) -> str | None:
    """The LLaVA layout a module or tensor name is spelled in (None: not a layout name)."""
    _, rest = _split(name)
    for layout in (HF_LAYOUT, HF_LEGACY_LAYOUT, ORIGINAL_LAYOUT):  # most specific prefixes first
        if any(rest.startswith(_LM_PREFIX[layout] + child) for child in LM_CHILDREN):
            return layout
        projector = _PROJECTOR_PREFIX[layout]
        layers = PROJECTOR_LAYERS.values() if layout == ORIGINAL_LAYOUT else PROJECTOR_LAYERS
        if any(rest.startswith(f"{projector}{layer}.") for layer in layers):
            return layout
    return None


def spell(canonical: str, layout: str) -> str:
    """A canonical (original-layout) name as ``layout`` spells it: the inverse of
    canonical_name for layout names; any other name is returned unchanged."""
    prefix, rest = _split(canonical)
    if rest.startswith(ORIGINAL_PROJECTOR):
        index, _, tail = rest[len(ORIGINAL_PROJECTOR) :].partition(".")
        if index in _ORIGINAL_INDEX:
            layer = index if layout == ORIGINAL_LAYOUT else _ORIGINAL_INDEX[index]
            rest = f"{_PROJECTOR_PREFIX[layout]}{layer}.{tail}"
    elif any(rest.startswith(ORIGINAL_LM_PREFIX + child) for child in LM_CHILDREN):
        rest = _LM_PREFIX[layout] + rest[len(ORIGINAL_LM_PREFIX) :]
    return prefix + rest[:-1]


@lru_cache(maxsize=_KEY_CACHE)
def output_name(canonical: str, first_spelling: str, layout: str | None) -> str:
    """The output spelling of a module or tensor: in the output layout when it is a layout
    name, else as the first adapter that carries it spells it."""
    if layout is None or layout_of(first_spelling) is None:
        return first_spelling
    return spell(canonical, layout)
