"""Adapters as the merge sees them: a label, a LoRA config and lazily read tensors.

Whatever the user hands to ``merge()`` (a PEFT folder, a state dict, a
``(state_dict, config)`` pair, a live ``PeftModel``) becomes an :class:`AdapterSource`.
Safetensors files are memory-mapped and read one tensor at a time, so planning a merge
touches only headers and merging holds one module's inputs at a time.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
NON_LORA_NAME = "non_lora_trainables.bin"  # original LLaVA checkpoints: the mm_projector
SAFETENSORS_NAME = "adapter_model.safetensors"
INDEX_NAME = "adapter_model.safetensors.index.json"  # sharded weights (Hugging Face convention)
BIN_NAME = "adapter_model.bin"


@dataclass
class AdapterSource:
    """One input adapter. ``label`` is how errors and summaries name it."""

    label: str
    config: dict[str, Any] | None
    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]
    _loader: Any  # callable key -> tensor
    path: str | None = None  # the weights file, when read from one
    closer: Any = None  # releases open files
    folder: str | None = None  # the adapter folder, when read from one
    files: list[str] = field(default_factory=list)  # every file the adapter was read from
    file_of: dict[str, str] = field(default_factory=dict)  # key -> file name, for tensors outside the weights file
    shard_paths: list[str] = field(default_factory=list)  # sharded weights: every shard file


    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

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


# safetensors dtype names this library merges (others are refused when planned).
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_OTHER = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    """A safetensors file read tensor by tensor with positional reads into fresh buffers.

    Reading with preadv instead of memory-mapping keeps the file's pages out of the
    process: peak memory is what the merge holds, not the size of the inputs. The header
    is validated up front (offsets inside the file, sizes matching dtype and shape, no
    duplicate keys), so a truncated or corrupt file is refused before any merging.
    """

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, reason: str, key: str | None = None):
        raise AdapterError(f"corrupt safetensors file {self.path!r}: {reason}", self.label, key)

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            self._fail("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            self._fail(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(f"header is not valid JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self._data = 8 + n
        self.shapes, self.dtypes, self._spans = {}, {}, {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                self._fail("malformed tensor entry", key)
            if name not in ST_DTYPES:
                if name not in _ST_OTHER:
                    self._fail(f"unknown dtype {name!r}", key)
                raise AdapterError(f"dtype {name} is not a floating-point type this library merges", self.label, key)
            numel = 1
            for d in shape:
                if d < 0:
                    self._fail(f"negative dimension in shape {list(shape)}", key)
                numel *= d
            if not (0 <= start <= end <= size - self._data) or end - start != numel * ST_DTYPES[name].itemsize:
                self._fail(f"data offsets [{start}, {end}) do not fit the file or the shape {list(shape)}", key)
            self.shapes[key], self.dtypes[key], self._spans[key] = shape, ST_DTYPES[name], start

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        view = byte_view(out)
        got, offset = 0, self._data + self._spans[key]
        while got < len(view):  # preadv may return short counts
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                self._fail("file ended inside the tensor's data", key)
            got += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_sharded(folder: str, index_path: str, label: str) -> AdapterSource:
    """Sharded weights: the index maps each key to its shard; every key must be there."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot parse {INDEX_NAME}: {exc}", label) from exc
    shards: dict[str, SafetensorsFile] = {}
    shapes, dtypes, where = {}, {}, {}
    try:
        for name in sorted(set(weight_map.values())):
            if os.path.basename(name) != name:
                raise AdapterError(f"shard name {name!r} in {INDEX_NAME} is not a file in the folder", label)
            shards[name] = SafetensorsFile(os.path.join(folder, name), label)
        for key, name in weight_map.items():
            if key not in shards[name].shapes:
                raise AdapterError(f"{INDEX_NAME} puts the tensor in {name}, which lacks it", label, key)
            shapes[key], dtypes[key], where[key] = shards[name].shapes[key], shards[name].dtypes[key], shards[name]
    except BaseException:
        for shard in shards.values():
            shard.close()
        raise

    def close():
        for shard in shards.values():
            shard.close()

    source = AdapterSource(label, None, shapes, dtypes, lambda key: where[key].read(key), path=index_path, closer=close)
    source.shard_paths = [os.path.join(folder, name) for name in shards]
    return source


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (for positional reads/writes).
    The view does not own the memory: the caller keeps ``t`` alive while using it."""
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _open_safetensors(path: str, label: str) -> AdapterSource:
    try:
        f = SafetensorsFile(path, label)
    except OSError as exc:
        raise AdapterError(f"cannot read safetensors file {path!r}: {exc}", label) from exc
    return AdapterSource(label, None, f.shapes, f.dtypes, f.read, path=path, closer=f.close)


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


def _attach_non_lora(source: AdapterSource, extra: AdapterSource) -> None:
    """Add the tensors of non_lora_trainables.bin to an adapter, remembering their file."""
    for key in extra.keys():
        if key in source._shapes:
            raise AdapterError(f"tensor is in both the weights file and {NON_LORA_NAME}", source.label, key)
        source._shapes[key] = extra.shape(key)
        source._dtypes[key] = extra.dtype(key)
        source.file_of[key] = NON_LORA_NAME
    main_loader = source._loader
    source._loader = lambda key: extra.get(key) if key in source.file_of else main_loader(key)


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
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(st_path):
            source = _open_safetensors(st_path, label)
        elif os.path.isfile(index_path):
            source = _open_sharded(folder, index_path, label)
        elif os.path.isfile(bin_path):
            state = _load_bin(bin_path, label)
            source = _from_state_dict(state, None, label)
            source.path = bin_path
        else:
            raise AdapterError(f"no {SAFETENSORS_NAME}, {INDEX_NAME} or {BIN_NAME} in {folder!r}", label)
        source.config = config
        source.folder = folder
        source.files = [os.path.join(folder, CONFIG_NAME), *(source.shard_paths or [source.path])]
        non_lora = os.path.join(folder, NON_LORA_NAME)
        if os.path.isfile(non_lora):
            _attach_non_lora(source, _from_state_dict(_load_bin(non_lora, label), None, label))
            source.files.append(non_lora)
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
