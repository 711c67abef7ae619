"""Adapters as the merge sees them: a label, a LoRA config and lazily read tensors.

Whatever the user hands to ``merge()`` (a PEFT folder, a state dict, a
``(state_dict, config)`` pair, a live ``PeftModel``) becomes an :class:`AdapterSource`.
Safetensors files are read one tensor at a time with positional reads
(:mod:`.safetensors_io`), so planning a merge touches only headers and merging holds one
group of modules' inputs at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any

import torch

from ..errors import AdapterError
from . import hub
from .files import check_regular, read_json
from .names import BIN_NAME, CONFIG_NAME, INDEX_NAME, MODEL_CONFIG_NAME, NON_LORA_NAME, SAFETENSORS_NAME
from .safetensors_io import SafetensorsFile


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
    hub: Any = None  # hub.HubAdapter: the Hub id and commit this folder was resolved from
    _rows: Any = None  # callable (key, start, stop) -> rows of a file-backed tensor, read alone
    # In-memory state dicts: the tensors ``get`` returns (a plain lookup, nothing to read or
    # wrap) and their one device (None when they are on several), so the pipeline can take
    # them as they are (RobustMergeRun._load_group). None for every other source.
    tensors: dict[str, torch.Tensor] | None = None
    device: torch.device | None = None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def all_shapes(self) -> list[tuple[int, ...]]:
        """Every tensor's shape, in the order of keys()."""
        return list(self._shapes.values())

    def all_dtypes(self) -> list[torch.dtype]:
        """Every tensor's dtype, in the order of keys()."""
        return list(self._dtypes.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor with at least one dimension; from a file only those
        rows are read, in memory it is a view."""
        if self._rows is None or key in self.file_of:
            return self.get(key)[start:stop]
        try:
            return self._rows(key, start, stop)
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"cannot read tensor data ({exc})", self.label, key) from exc

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._loader(key)
        except AdapterError:
            raise
        except Exception as exc:  # corrupt or truncated data surfaces here
            raise AdapterError(f"cannot read tensor data ({exc})", self.label, key) from exc


def _read_config(folder: str, label: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.lexists(path):
        raise AdapterError(f"missing {CONFIG_NAME} in {folder!r}; not a PEFT adapter folder", label)
    config = read_json(path, label, folder)
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} is not a JSON object", label)
    return config


def _shard_name(name: Any, label: str) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name:
        raise AdapterError(f"shard name {name!r} in {INDEX_NAME} is not a file in the folder", label)
    return name


def _open_sharded(folder: str, index_path: str, label: str) -> AdapterSource:
    """Sharded weights: the index maps each key to its shard; every key must be there."""
    index = read_json(index_path, label, folder)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AdapterError(f"cannot parse {INDEX_NAME}: no weight_map object mapping tensors to shard files", label)
    shards: dict[str, SafetensorsFile] = {}
    shapes, dtypes, where = {}, {}, {}
    for name in sorted({_shard_name(n, label) for n in weight_map.values()}):
        shards[name] = SafetensorsFile(os.path.join(folder, name), label, folder)
    for key, name in weight_map.items():
        if key not in shards[name].shapes:
            raise AdapterError(f"{INDEX_NAME} puts the tensor in {name}, which lacks it", label, key)
        shapes[key], dtypes[key], where[key] = shards[name].shapes[key], shards[name].dtypes[key], shards[name]
    for name, shard in shards.items():
        extra = next((k for k in shard.shapes if k not in weight_map), None)
        if extra is not None:  # a tensor the index does not list would be silently dropped
            raise AdapterError(f"{name} holds a tensor that {INDEX_NAME} does not list", label, extra)
    source = AdapterSource(label, None, shapes, dtypes, lambda key: where[key].read(key), path=index_path)
    source._rows = lambda key, start, stop: where[key].read_rows(key, start, stop)
    source.shard_paths = [os.path.join(folder, name) for name in shards]
    return source


def _open_safetensors(path: str, label: str, folder: str | None = None) -> AdapterSource:
    try:
        f = SafetensorsFile(path, label, folder)
    except OSError as exc:
        raise AdapterError(f"cannot read safetensors file {path!r}: {exc}", label) from exc
    return AdapterSource(label, None, f.shapes, f.dtypes, f.read, path=path, closer=f.close, _rows=f.read_rows)


# Header reads of one attribute over many tensors at once (map calls them from C: about
# 0.05 us per tensor instead of a Python loop's 1-2 us per check).
_LAYOUT, _IS_NESTED, _IS_QUANTIZED = attrgetter("layout"), attrgetter("is_nested"), attrgetter("is_quantized")
_DEVICE, _REQUIRES_GRAD = attrgetter("device"), attrgetter("requires_grad")
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")


def _from_state_dict(state_dict: Mapping[str, Any], config: dict | None, label: str) -> AdapterSource:
    if not isinstance(state_dict, Mapping):
        raise AdapterError(f"expected a state dict (mapping of str to tensor), got {type(state_dict).__name__}", label)
    keys, values = list(state_dict), list(state_dict.values())  # no (key, value) tuple per tensor
    dtypes, shapes_list, devices = _checked_headers(keys, values, label)
    if set(map(type, values)) == {torch.Tensor} and not any(map(_REQUIRES_GRAD, values)):
        tensors = dict(zip(keys, values))  # detach() would return an equal alias: nothing to cut from autograd
    else:
        tensors = {k: v.detach() for k, v in zip(keys, values)}
    shapes = dict(zip(keys, shapes_list))
    source = AdapterSource(label, config, shapes, dict(zip(keys, dtypes)), tensors.__getitem__)
    source.tensors = tensors
    source.device = next(iter(devices)) if len(devices) == 1 else None
    return source


def _checked_headers(
    keys: list[Any], values: list[Any], label: str
) -> tuple[list[torch.dtype], list[tuple[int, ...]], set[torch.device]]:
    """(dtypes, shapes, devices) of the tensors, after the checks of _refuse_first made over
    all tensors at once; when one fails, _refuse_first names the first tensor that fails it.

    Shapes are plain tuples, not torch.Size: the garbage collector untracks a tuple of ints,
    so the shapes of thousands of tensors do not keep promoting objects towards a full
    collection."""
    from ..backends.tables import read_headers  # the compiled reader, where torch and the build allow

    if not all(map(isinstance, keys, repeat(str))):
        _refuse_first(keys, values, label)
    fast = read_headers(values)  # one C pass; it takes only dense, strided, non-meta plain tensors
    if fast is not None:
        return fast
    if not all(map(isinstance, values, repeat(torch.Tensor))):
        _refuse_first(keys, values, label)
    dtypes, devices = list(map(_DTYPE, values)), set(map(_DEVICE, values))
    if not (
        set(map(_LAYOUT, values)) <= {torch.strided}
        and not any(map(_IS_NESTED, values))
        # quantized tensors never have a floating-point dtype: only other dtypes need the flag read
        and (all(d.is_floating_point for d in set(dtypes)) or not any(map(_IS_QUANTIZED, values)))
        and all(d.type != "meta" for d in devices)
    ):
        _refuse_first(keys, values, label)
    return dtypes, list(map(tuple, map(_SHAPE, values))), devices


def _refuse_first(keys: list[Any], values: list[Any], label: str) -> None:
    """The per-tensor checks, in key order: raises the first problem."""
    for key, value in zip(keys, values):
        if not isinstance(key, str):
            raise AdapterError(f"state dict key {key!r} is not a string", label)
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"value is a {type(value).__name__}, not a tensor", label, key)
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise AdapterError(f"{value.layout} tensors cannot be merged; pass dense tensors", label, key)
        if value.device.type == "meta":
            raise AdapterError("is a meta tensor (no data); load the weights before merging", label, key)


def _weights_only_reason(exc: Exception) -> str:
    """torch's refusal, without its advice to retry with weights_only=False (which would
    let the file run code): the part that says what the file contains."""
    text = str(exc)
    if "weights_only" in text or "WeightsUnpickler" in text:
        detail = (
            text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
            if "WeightsUnpickler error:" in text
            else ""
        )
        return "it holds objects other than tensors, which are refused because loading them could run code" + (
            f" ({detail})" if detail else ""
        )
    return text


def _load_bin(path: str, label: str, folder: str | None = None) -> Mapping[str, Any]:
    """torch.load a .bin adapter, memory-mapped (paged in as the merge reads it) when the
    file is in the zip format; the legacy pre-1.6 format cannot be mapped and loads whole.

    The tensors' bytes are bounded by the file's size: views sharing one storage would
    otherwise turn a few megabytes in into gigabytes materialised and written.
    """
    check_regular(path, label, folder)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"cannot load {path!r}: {_weights_only_reason(exc)}", label) from None
    if isinstance(state, Mapping):
        size = os.path.getsize(path)
        total = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        if total > size:
            raise AdapterError(
                f"{os.path.basename(path)} is {size} bytes but its tensors total {total}: they share storage "
                "(views of one buffer), which is refused",
                label,
            )
    return state


def _attach_non_lora(source: AdapterSource, extra: AdapterSource) -> None:
    """Add the tensors of non_lora_trainables.bin to an adapter, remembering their file."""
    for key in extra.keys():
        if key in source._shapes:
            raise AdapterError(f"tensor is in both the weights file and {NON_LORA_NAME}", source.label, key)
        source._shapes[key] = extra.shape(key)
        source._dtypes[key] = extra.dtype(key)
        source.file_of[key] = NON_LORA_NAME
    main_loader = source._loader
    source.tensors = None  # get() is no longer a plain lookup
    source._loader = lambda key: extra.get(key) if key in source.file_of else main_loader(key)


def _config_to_dict(config: Any, label: str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise AdapterError(f"config must be a dict or a LoraConfig, got {type(config).__name__}", label)


def is_peft_model(obj: Any) -> bool:
    return hasattr(obj, "peft_config") and hasattr(obj, "state_dict")


def open_peft_adapter(model: Any, name: str, label: str) -> AdapterSource:
    """One named adapter of a PeftModel, with its config."""
    from peft import get_peft_model_state_dict

    if name not in model.peft_config:
        raise AdapterError(f"the model has no adapter {name!r} (it has {', '.join(sorted(model.peft_config))})", label)
    state = get_peft_model_state_dict(model, adapter_name=name)
    return _from_state_dict(state, _config_to_dict(model.peft_config[name], label), label)


def open_adapter(obj: Any, index: int) -> AdapterSource:
    """Turn one user input into an AdapterSource (the index names it in errors)."""
    if isinstance(obj, (str, os.PathLike)):
        folder = os.fspath(obj)
        label = f"#{index} ({folder})"
        ref = hub.parse_hub_id(folder) if isinstance(obj, str) else None
        resolved = None
        if ref is not None:
            try:
                resolved = hub.resolve(ref, label)
            except AdapterError as exc:  # a Hub-shaped string may also be a mistyped local path
                raise AdapterError(
                    f"no such adapter folder {folder!r}, nor a Hub adapter: {exc.reason}", label
                ) from exc
            folder = resolved.folder
        if not os.path.isdir(folder):
            raise AdapterError(f"no such adapter folder {folder!r}", label)
        config = _read_config(folder, label)
        st_path = os.path.join(folder, SAFETENSORS_NAME)
        bin_path = os.path.join(folder, BIN_NAME)
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.lexists(st_path):
            source = _open_safetensors(st_path, label, folder)
        elif os.path.lexists(index_path):
            source = _open_sharded(folder, index_path, label)
        elif os.path.lexists(bin_path):
            state = _load_bin(bin_path, label, folder)
            source = _from_state_dict(state, None, label)
            source.path = bin_path
        else:
            raise AdapterError(f"no {SAFETENSORS_NAME}, {INDEX_NAME} or {BIN_NAME} in {folder!r}", label)
        source.config = config
        source.folder = folder
        source.hub = resolved
        # every file the result depends on is hashed in the record, a sharded input's index too
        source.files = [os.path.join(folder, CONFIG_NAME), *source.shard_paths, source.path]
        non_lora = os.path.join(folder, NON_LORA_NAME)
        if os.path.lexists(non_lora):
            _attach_non_lora(source, _from_state_dict(_load_bin(non_lora, label, folder), None, label))
            source.files.append(non_lora)
        if os.path.isfile(os.path.join(folder, MODEL_CONFIG_NAME)):  # carried into the output: hash it too
            source.files.append(os.path.join(folder, MODEL_CONFIG_NAME))
        return source
    label = f"#{index}"
    if is_peft_model(obj):  # a live PeftModel: its active adapter
        name = getattr(obj, "active_adapter", "default")
        if not isinstance(name, str):
            name = name[0]
        return open_peft_adapter(obj, name, label)
    if isinstance(obj, tuple) and len(obj) == 2:
        return _from_state_dict(obj[0], _config_to_dict(obj[1], label), label)
    if isinstance(obj, Mapping):
        return _from_state_dict(obj, None, label)
    raise AdapterError(
        f"cannot read an adapter from a {type(obj).__name__}; pass a PEFT folder, a state dict, "
        "a (state_dict, config) pair or a PeftModel",
        label,
    )


def warn_repeated_folders(sources: list[AdapterSource]) -> None:
    """The same folder given twice counts twice in the mean: legal, but rarely meant."""
    import warnings

    seen: dict[str, str] = {}
    for s in sources:
        if s.folder is None:
            continue
        real = os.path.realpath(s.folder)
        if real in seen:
            warnings.warn(
                f"adapter {s.label} is the same folder as adapter {seen[real]}; it is merged twice", stacklevel=3
            )
        seen.setdefault(real, s.label)
