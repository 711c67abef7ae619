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

from ..errors import AdapterError
from .names import CONFIG_NAME, INDEX_NAME, RECORD_NAME, SAFETENSORS_NAME
from .safetensors_io import SafetensorsStream


def _shard_files(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> dict[str, str]:
    """The file of every key, in key order: one file, or shards of at most ``max_shard_size``
    bytes (a tensor larger than the limit gets a shard of its own)."""
    groups, size = [[]], 0
    for key, t in tensors.items():
        if max_shard_size is not None and groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += t.nbytes
    n = len(groups)
    name = (lambda i: SAFETENSORS_NAME) if n == 1 else (lambda i: f"adapter_model-{i + 1:05d}-of-{n:05d}.safetensors")
    return {key: name(i) for i, keys in enumerate(groups) for key in keys}


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


class StagedAdapter:
    """An adapter folder being written: a hidden temporary folder beside the destination,
    renamed into place by commit(); on any error (leaving the ``with`` block by an
    exception) it is removed and a replaced destination is left as it was."""

    def __init__(self, out: str, overwrite: bool):
        self.out = check_destination(out, overwrite)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=os.path.dirname(self.out))
        self.streams: list[SafetensorsStream] = []

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def stream(
        self, entries: list[tuple[str, tuple[int, ...], torch.dtype]], expect: set[str] | None = None
    ) -> SafetensorsStream:
        """adapter_model.safetensors, written as tensors arrive; ``expect``: the keys this
        process writes (a distributed merge's other ranks write the rest)."""
        self.streams.append(SafetensorsStream(self.path(SAFETENSORS_NAME), entries, expect=expect))
        return self.streams[-1]

    def write_tensors(self, tensors: dict[str, torch.Tensor], max_shard_size: int | None = None) -> None:
        """adapter_model.safetensors (or shards with an index) from tensors in memory."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        files = _shard_files(tensors, max_shard_size)
        for name in dict.fromkeys(files.values()):
            save_file({k: t for k, t in tensors.items() if files[k] == name}, self.path(name), metadata={"format": "pt"})
            _fsync_file(self.path(name))
        if len(set(files.values())) > 1:
            total = sum(t.nbytes for t in tensors.values())
            _write_json(self.path(INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": files})

    def write_torch(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors in the torch.save format they came in (non_lora_trainables.bin)."""
        torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, self.path(name))
        _fsync_file(self.path(name))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        _write_json(self.path(name), data)

    def write_text(self, name: str, text: str) -> None:
        with open(self.path(name), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> str:
        for stream in self.streams:
            stream.close()
        backup = None
        if os.path.exists(self.out):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
            os.rmdir(backup)
            os.rename(self.out, backup)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if backup is not None:
                os.rename(backup, self.out)  # put the user's previous adapter back
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        for stream in self.streams:
            try:
                stream.close()
            except RuntimeError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StagedAdapter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def finish_adapter(staged: StagedAdapter, tensors, files: dict[str, str], config, record) -> None:
    """The files beside the weights: other-format tensors, the config and the record."""
    for name in sorted(set(files.values())):
        staged.write_torch(name, {k: tensors[k] for k, f in files.items() if f == name})
    staged.write_json(CONFIG_NAME, config)
    staged.write_json(RECORD_NAME, record)
