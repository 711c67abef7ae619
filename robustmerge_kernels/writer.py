"""Write a merged adapter as a PEFT folder, atomically.

Everything is written into a hidden temporary folder beside the destination, flushed to
disk, and only then renamed into place. A crash or error mid-write leaves at most a
``.<name>.tmp-*`` folder (never a folder under the requested name that looks complete),
and an existing destination is replaced only when asked, and only after the new one is
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from .errors import AdapterError
from .sources import CONFIG_NAME, INDEX_NAME, SAFETENSORS_NAME

RECORD_NAME = "robustmerge.json"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shard_names(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> list[list[str]]:
    """Keys per shard, in key order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_size is None:
        return [list(tensors)]
    shards, size = [[]], 0
    for key, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(t)
    return shards


def _shard_file(i: int, n: int) -> str:
    return SAFETENSORS_NAME if n == 1 else f"adapter_model-{i + 1:05d}-of-{n:05d}.safetensors"


def _shards(tensors, max_shard_size):
    groups = _shard_names(tensors, max_shard_size)
    for i, keys in enumerate(groups):
        yield _shard_file(i, len(groups)), {k: tensors[k] for k in keys}


def _index(tensors, max_shard_size) -> dict[str, Any]:
    groups = _shard_names(tensors, max_shard_size)
    weight_map = {k: _shard_file(i, len(groups)) for i, keys in enumerate(groups) for k in keys}
    return {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}


def check_destination(out: str, overwrite: bool) -> str:
    """Refuse early (before any merging) a destination that would fail at the end."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    if os.path.exists(out) and not overwrite:
        raise AdapterError(f"output {out!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise AdapterError(f"output {out!r} exists and is not a folder; refusing to replace it")
    if not os.path.isdir(parent):
        raise AdapterError(f"parent folder of output {out!r} does not exist")
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    value = getattr(obj, "value", None)  # enums such as PeftType / TaskType
    return value if value is not None else str(obj)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter(
    out: str,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    record: dict[str, Any],
    overwrite: bool = False,
    files: dict[str, str] | None = None,
    max_shard_size: int | None = None,
) -> str:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and the merge record.

    Keys listed in ``files`` go to that file instead, saved with torch.save as the format
    they came in (original LLaVA's non_lora_trainables.bin). With ``max_shard_size`` (bytes)
    a larger adapter is split into ``adapter_model-0000i-of-0000N.safetensors`` files with an
    ``adapter_model.safetensors.index.json`` (the Hugging Face convention). peft 0.21 loads
    only single-file adapters, so sharding is opt-in."""
    from safetensors.torch import save_file

    out = check_destination(out, overwrite)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    backup = None
    try:
        files = files or {}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in files}
        for name, shard in _shards(tensors, max_shard_size):
            weights = os.path.join(tmp, name)
            save_file(shard, weights, metadata={"format": "pt"})
            _fsync_file(weights)
        if max_shard_size is not None and len(os.listdir(tmp)) > 1:
            _write_json(os.path.join(tmp, INDEX_NAME), _index(tensors, max_shard_size))
        for name in sorted(set(files.values())):
            path = os.path.join(tmp, name)
            torch.save({k: state_dict[k].detach().to("cpu").contiguous() for k, f in files.items() if f == name}, path)
            _fsync_file(path)
        _write_json(os.path.join(tmp, CONFIG_NAME), config)
        _write_json(os.path.join(tmp, RECORD_NAME), record)
        if os.path.exists(out):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
            os.rmdir(backup)
            os.rename(out, backup)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and not os.path.exists(out):
            os.rename(backup, out)  # put the user's previous adapter back
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return out
