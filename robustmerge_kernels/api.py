"""``merge()``: the one public entry point behind the Python API and the CLI."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .backends import ModuleInputs, NonFiniteInput, OutputOverflow, get_backend
from .errors import AdapterError
from .params import RobustMergeParams
from .plan import MergePlan, ModulePlan, build_plan
from .reference import mean_tensors
from .sources import AdapterSource, open_adapter
from .record import InputHashes, build_record
from .writer import check_destination, write_adapter

METHODS = ("robustmerge",)

# Modules are handed to the backend in groups of about this many input bytes: large enough
# for a fused kernel to fill the machine, small enough to bound memory by a working set.
# Inputs read from files are copied into memory per group, so their groups are smaller.
DEFAULT_GROUP_BYTES = 256 << 20
FILE_GROUP_BYTES = 64 << 20

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise AdapterError(f"unknown output dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str | None) -> int | None:
    """Bytes from 123, "500MB", "5GB", "2GiB" (None stays None)."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool)):
        if size is not None and size < 1:
            raise AdapterError(f"max_shard_size must be positive, got {size!r}")
        return size
    text = str(size).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise AdapterError(f"cannot read size {size!r}; use bytes or e.g. 500MB, 5GB") from None
    if value < 1:
        raise AdapterError(f"max_shard_size must be positive, got {size!r}")
    return int(value)


@dataclass
class MergeReport:
    method: str
    backend: str
    adapters: list[str]
    modules: int
    parameters: int  # elements in the merged adapter
    bytes_in: int
    seconds: float
    hyperparameters: dict[str, float]
    partial_modules: dict[str, list[str]] = field(default_factory=dict)  # module -> adapters lacking it
    averaged_tensors: int = 0

    def summary(self) -> str:
        line = (
            f"merged {len(self.adapters)} adapters with {self.method}: {self.modules} modules, "
            f"{_count(self.parameters)} parameters, {self.seconds:.2f} s, backend {self.backend}"
        )
        if self.averaged_tensors:
            line += f", {self.averaged_tensors} non-LoRA tensors averaged"
        if self.partial_modules:
            line += f", {len(self.partial_modules)} modules missing from some adapters"
        return line


def _count(n: int) -> str:
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


class MergedAdapter(dict):
    """The merged state dict (PEFT saved-key form), with ``config`` and ``report`` attached.

    ``files`` maps the keys that belong in a file other than adapter_model.safetensors
    (the mm_projector of an original LLaVA checkpoint: non_lora_trainables.bin) to it.
    """

    config: dict[str, Any] | None
    report: MergeReport

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.files: dict[str, str] = {}


def _device_of(sources: list[AdapterSource], plan: MergePlan) -> torch.device:
    """Merge where the inputs are: the device of the first tensor (files load to CPU)."""
    if sources[0].path is not None or not plan.modules:
        return torch.device("cpu")
    return sources[0].get(plan.modules[0].a_keys[0]).device


def require_finite(x: torch.Tensor, adapter: str, key: str) -> None:
    """Refuse NaN/Inf input. A finite sum proves every element finite (NaN and Inf always
    propagate into it) at a fraction of the cost of isfinite() over the tensor; only a
    non-finite sum, which a huge but finite tensor can also give, needs the full check."""
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise AdapterError(f"contains {bad} NaN/Inf values; refusing to merge non-finite weights", adapter, key)


def _load(source: AdapterSource, key: str, device: torch.device, check_finite: bool = True) -> torch.Tensor:
    x = source.get(key)
    if check_finite:
        require_finite(x, source.label, key)
    return x.to(device)


def _finite_output(key: str, x: torch.Tensor) -> torch.Tensor:
    """Finite inputs can still overflow the output dtype (lam * sum of fp16 values): refuse."""
    if not torch.isfinite(x).all():
        _refuse_overflow(key, x.dtype)
    return x


def _refuse_overflow(key: str, dtype: torch.dtype):
    raise AdapterError(
        f"merged values overflow the output dtype {dtype}; choose a wider dtype (dtype='fp32', --dtype fp32)",
        tensor=key,
    )


def _groups(modules: list[ModulePlan], group_bytes: int) -> Iterator[list[ModulePlan]]:
    group, size = [], 0
    for m in modules:
        nbytes = m.nbytes_in
        if group and size + nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(m)
        size += nbytes
    if group:
        yield group


def merge(
    adapters: Sequence[Any],
    method: str = "robustmerge",
    density: float = 0.2,
    clamp_quantile: float = 0.8,
    lam: float = 2.0,
    backend: str = "auto",
    out: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    group_bytes: int | None = None,
    max_shard_size: int | str | None = None,
) -> MergedAdapter:
    """Merge LoRA adapters into one adapter of the same rank.

    ``adapters``: PEFT adapter folders, state dicts, ``(state_dict, LoraConfig-or-dict)``
    pairs or ``PeftModel`` objects, in any mix. Returns the merged state dict (keys as PEFT
    saves them) with ``.config`` (the output ``adapter_config.json``) and ``.report``;
    with ``out`` it is also written there as a PEFT adapter folder, atomically
    (``max_shard_size``, bytes or "5GB": split larger weights into indexed shards, which
    peft 0.21 cannot load; single-file output is the default).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}; available: {', '.join(METHODS)}")
    if isinstance(adapters, (str, os.PathLike, dict)) or not isinstance(adapters, Sequence):
        raise AdapterError("adapters must be a list (of folders, state dicts, pairs or models)")
    params = RobustMergeParams(density, clamp_quantile, lam)
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out is not None:
        check_destination(out, overwrite)

    sources: list[AdapterSource] = []
    try:
        for i, a in enumerate(adapters):
            sources.append(open_adapter(a, i))
        return _merge_sources(
            sources, method, params, out_dtype, backend, out, overwrite, progress, group_bytes, shard_bytes, start
        )
    finally:
        for source in sources:
            source.close()


def _merge_sources(sources, method, params, out_dtype, backend, out, overwrite, progress, group_bytes, shard_bytes, start):
    plan = build_plan(sources, out_dtype)
    if out is not None and plan.out_config is None:
        raise AdapterError("cannot write a PEFT folder: no adapter came with a LoRA config; pass (state_dict, config)")
    device = _device_of(sources, plan)
    impl = get_backend(backend, device.type)

    hashes = InputHashes(sources) if out is not None else None
    try:
        merged = _run_plan(plan, sources, impl, params, device, progress, group_bytes)
    except BaseException:
        if hashes is not None:
            hashes.cancel()
        raise
    merged.report = MergeReport(
        method=method,
        backend=impl.name,
        adapters=[s.label for s in sources],
        modules=len(plan.modules),
        parameters=sum(v.numel() for v in merged.values()),
        bytes_in=plan.bytes_in(),
        seconds=0.0,
        hyperparameters=asdict(params),
        partial_modules={
            m.name: [s.label for t, s in enumerate(sources) if t not in m.members] for m in plan.partial_modules()
        },
        averaged_tensors=len(plan.means),
    )
    if out is not None:
        report = {k: v for k, v in asdict(merged.report).items() if k not in ("seconds", "adapters")}
        record = build_record(sources, hashes.result(), report)
        write_adapter(out, merged, plan.out_config, record, overwrite, merged.files, shard_bytes)
    merged.report.seconds = time.perf_counter() - start
    return merged


def _run_plan(plan, sources, impl, params, device, progress, group_bytes) -> MergedAdapter:
    """Load, merge and collect every module group, then the averaged non-LoRA tensors."""
    merged = MergedAdapter()
    merged.config = plan.out_config
    bar = _progress_bar(len(plan.modules), progress)
    scan = not getattr(impl, "checks_finite", False)  # kernels that see inf/NaN themselves skip a pass
    if group_bytes is None:
        group_bytes = FILE_GROUP_BYTES if any(s.path is not None for s in sources) else DEFAULT_GROUP_BYTES
    for group in _groups(plan.modules, group_bytes):
        inputs = [
            ModuleInputs(
                m,
                [_load(sources[t], k, device, scan) for t, k in zip(m.members, m.a_keys)],
                [_load(sources[t], k, device, scan) for t, k in zip(m.members, m.b_keys)],
            )
            for m in group
        ]
        try:
            results = impl.robustmerge(inputs, params)
        except NonFiniteInput as exc:  # name the adapter and tensor, with the full count
            t = exc.plan.members[exc.member]
            key = (exc.plan.a_keys if exc.factor == "A" else exc.plan.b_keys)[exc.member]
            require_finite(sources[t].get(key), sources[t].label, key)
            raise AdapterError("contains NaN/Inf values", sources[t].label, key) from exc
        except OutputOverflow as exc:
            _refuse_overflow(exc.plan.a_key if exc.factor == "A" else exc.plan.b_key, exc.plan.out_dtype)
        for m, (a, b) in zip(group, results):
            merged[m.a_key] = a if not scan else _finite_output(m.a_key, a)
            merged[m.b_key] = b if not scan else _finite_output(m.b_key, b)
        bar.update(len(group))
    bar.close()
    for mean in plan.means:
        values = [_load(sources[t], key, device) for t, key in zip(mean.members, mean.keys)]
        merged[mean.key] = _finite_output(mean.key, mean_tensors(values, mean.out_dtype))
        if mean.file is not None:
            merged.files[mean.key] = mean.file

    return merged


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="module", desc="merging", leave=False)
