"""config.json (the model config) of original LLaVA LoRA folders, carried into the output.

LLaVA's ``load_pretrained_model`` builds the model from ``LlavaConfig.from_pretrained`` of
the LoRA folder itself, so a merged folder without config.json does not load there. The
official merge loop (``load_and_merge_pretrained_model``) writes the config of its first
adapter; so does this: identical configs are copied, differing ones give the first
adapter's, and the report says which adapters differ and in which keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterError
from .names import MODEL_CONFIG_NAME
from .sources import AdapterSource

MAX_CONFIG_BYTES = 16 << 20  # a model config is a few kB; refuse to slurp anything huge


@dataclass
class ModelConfig:
    """The config.json to write: ``data`` (the first carrier's bytes) and where it came from."""

    source: str  # label of the adapter whose file is written
    data: bytes
    differs: list[str] = field(default_factory=list)  # adapters whose config.json differs
    differing_keys: list[str] = field(default_factory=list)  # top-level keys that differ
    missing: list[str] = field(default_factory=list)  # adapters without a config.json

    def summary(self) -> dict[str, Any]:
        """For the report and robustmerge.json."""
        out: dict[str, Any] = {"file": MODEL_CONFIG_NAME, "from": self.source}
        if self.differs:
            out.update(differs=self.differs, differing_keys=self.differing_keys)
        if self.missing:
            out["missing"] = self.missing
        return out


def _read(source: AdapterSource) -> tuple[bytes, dict[str, Any]] | None:
    if source.folder is None:
        return None
    path = os.path.join(source.folder, MODEL_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterError(f"cannot read {MODEL_CONFIG_NAME}: {exc}", source.label) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(
            f"{MODEL_CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes; not a model config", source.label
        )
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise AdapterError(f"cannot parse {MODEL_CONFIG_NAME}: {exc}", source.label) from exc
    if not isinstance(parsed, dict):
        raise AdapterError(f"{MODEL_CONFIG_NAME} is not a JSON object", source.label)
    return data, parsed


def choose_model_config(sources: list[AdapterSource]) -> ModelConfig | None:
    """The config.json for the output, or None when no input folder has one."""
    read = [_read(s) for s in sources]
    carriers = [(s, r) for s, r in zip(sources, read) if r is not None]
    if not carriers:
        return None
    first, (data, parsed) = carriers[0]
    choice = ModelConfig(first.label, data, missing=[s.label for s, r in zip(sources, read) if r is None])
    keys: set[str] = set()
    for source, (_, other) in carriers[1:]:
        if other != parsed:
            choice.differs.append(source.label)
            keys |= {k for k in parsed.keys() | other.keys() if parsed.get(k, None) != other.get(k, None)}
    choice.differing_keys = sorted(keys)
    return choice


def write_model_config(path: str, choice: ModelConfig) -> None:
    """The chosen bytes, unchanged (identical inputs: a copy), flushed to disk."""
    with open(path, "wb") as f:
        f.write(choice.data)
        f.flush()
        os.fsync(f.fileno())
