"""Write a merged adapter as a PEFT folder, atomically.

Everything is written into a hidden temporary folder beside the destination (marked with
its owner), flushed to disk, and only then renamed into place by destination.py, which
re-checks the destination at that instant. A crash or error mid-write leaves at most a
``.<name>.tmp-*`` folder (never a folder under the requested name that looks complete),
which the next merge to that name removes once its owner has ended; an existing
destination is replaced only when asked, only if it is an adapter folder (or forced),
and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Any

import torch

from ..errors import AdapterError
from ..jsonfile import write_json
from . import destination
from .destination import check_destination  # noqa: F401  (the API imports it from here)
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    value = getattr(obj, "value", None)  # enums such as PeftType / TaskType
    return value if value is not None else str(obj)


def _write_json(path: str, data: dict[str, Any]) -> None:
    # Inside the staged folder, which is renamed into place only when complete.
    write_json(path, data, atomic=False, sort_keys=True, default=_json_default)


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

    def __init__(self, out: str, overwrite: bool | str):
        """``overwrite``: False, True (replace an adapter folder) or "force" (any folder)."""
        self.tmp = None
        self.overwrite, self.force = bool(overwrite), overwrite == "force"
        self.out = check_destination(out, self.overwrite, force=self.force)
        self.streams: list[SafetensorsStream] = []
        parent = os.path.dirname(self.out)
        try:
            destination.recover(self.out)  # an interrupted earlier run: finish it, drop dead leftovers
        except OSError as exc:
            raise AdapterError(f"cannot recover an interrupted merge to {self.out!r}: {exc}; see `robustmerge "
                               "recover`") from exc  # fmt: skip
        try:
            self.tmp = tempfile.mkdtemp(prefix=f"{destination.hidden_stem(self.out)}.tmp-", dir=parent)
        except OSError as exc:
            raise AdapterError(f"cannot create a folder beside the output {self.out!r}: {exc.strerror}") from exc
        try:
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get normal permissions
            destination.write_owner(self.tmp, "tmp")
        except OSError as exc:
            self.abort()
            raise AdapterError(f"cannot write beside the output {self.out!r}: {exc.strerror}") from exc

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
            with self._naming_failures(name):  # safetensors reports ENOSPC as its own error type
                save_file(
                    {k: t for k, t in tensors.items() if files[k] == name}, self.path(name), metadata={"format": "pt"}
                )
            _fsync_file(self.path(name))
        if len(set(files.values())) > 1:
            total = sum(t.nbytes for t in tensors.values())
            _write_json(self.path(INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": files})

    def write_torch(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors in the torch.save format they came in (non_lora_trainables.bin)."""
        with self._naming_failures(name):  # torch.save reports ENOSPC as a RuntimeError
            torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, self.path(name))
        _fsync_file(self.path(name))

    @contextlib.contextmanager
    def _naming_failures(self, name: str):
        try:
            yield
        except OSError:
            raise
        except Exception as exc:
            hint = ""
            try:
                st = os.statvfs(self.tmp)
                if st.f_bavail * st.f_frsize < 1 << 20:
                    hint = " (the disk is full)"
            except OSError:
                pass
            raise AdapterError(f"cannot write {name} of the output {self.out!r}: {exc}{hint}") from exc

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
        destination.fsync_dir(self.tmp)
        if self.overwrite and os.path.lexists(self.out):
            old = destination.commit_replace(self.tmp, self.out, self.force)
            self.tmp = None  # committed: nothing to abort from here on
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                destination.commit_new(self.tmp, self.out)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise AdapterError(
                    f"output {self.out!r} appeared while merging (another merge to the same output?); it was "
                    "left untouched and this merge's result discarded"
                ) from exc
        self.tmp = None
        return self.out

    def abort(self) -> None:
        for stream in self.streams:
            try:
                stream.close()
            except (RuntimeError, OSError):
                pass
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)  # ours: made by mkdtemp in __init__
            self.tmp = None

    def __enter__(self) -> StagedAdapter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        self.abort()
        if issubclass(exc_type, OSError):  # ENOSPC, EROFS, EIO while writing: name the output
            raise AdapterError(f"cannot write the output {self.out!r}: {exc.strerror or exc}") from exc


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finish_adapter(staged: StagedAdapter, tensors, files: dict[str, str], config, record) -> None:
    """The files beside the weights: other-format tensors, the config and the record."""
    for name in sorted(set(files.values())):
        staged.write_torch(name, {k: tensors[k] for k, f in files.items() if f == name})
    staged.write_json(CONFIG_NAME, config)
    staged.write_json(RECORD_NAME, record)
