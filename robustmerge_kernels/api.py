"""``merge()``: the one public entry point behind the Python API and the CLI."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import methods as _methods
from .backends import ModuleInputs, NonFiniteInput, OutputOverflow, get_backend
from .errors import AdapterError
from .finite import all_finite
from .params import RobustMergeParams
from .plan import MergePlan, ModulePlan, build_plan
from .adapter_io.record import InputHashes, build_record
from .reference import mean_tensors
from .adapter_io.sources import AdapterSource, open_adapter
from .adapter_io.writer import StagedAdapter, check_destination, finish_adapter

METHODS = ("robustmerge", *_methods.METHODS)  # baselines: robustmerge_kernels.methods

# Modules are handed to the backend in groups of about this many input bytes: large enough
# for a fused kernel to fill the machine, small enough to bound memory by a working set.
# Inputs read from files are copied into memory per group, so their groups are smaller.
DEFAULT_GROUP_BYTES = 256 << 20
FILE_GROUP_BYTES = 64 << 20
CUDA_RESIDENT_GROUP_BYTES = 1 << 62  # the whole plan

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
    """Refuse NaN/Inf input, naming the adapter and tensor with the count."""
    if not all_finite(x):
        bad = (~torch.isfinite(x)).sum().item()
        raise AdapterError(f"contains {bad} NaN/Inf values; refusing to merge non-finite weights", adapter, key)


def _load(source: AdapterSource, key: str, device: torch.device, check_finite: bool = True) -> torch.Tensor:
    x = source.get(key)
    if check_finite:
        require_finite(x, source.label, key)
    return x.to(device)


def _finite_output(key: str, x: torch.Tensor) -> torch.Tensor:
    """Finite inputs can still overflow the output dtype (lam * sum of fp16 values): refuse."""
    if not all_finite(x):
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
    weights: Sequence[float] | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
    pcb_ratio: float = 0.1,
    keep_in_memory: bool = True,
) -> MergedAdapter:
    """Merge LoRA adapters into one adapter of the same rank.

    ``adapters``: PEFT adapter folders, state dicts, ``(state_dict, LoraConfig-or-dict)``
    pairs or ``PeftModel`` objects, in any mix. Returns the merged state dict (keys as PEFT
    saves them) with ``.config`` (the output ``adapter_config.json``) and ``.report``;
    with ``out`` it is also written there as a PEFT adapter folder, atomically
    (``max_shard_size``, bytes or "5GB": split larger weights into indexed shards, which
    peft 0.21 cannot load; single-file output is the default). RobustMerge output is
    written as it is produced; ``keep_in_memory=False`` then returns no tensors (only
    ``config`` and ``report``), so peak memory is a working set, not the whole output.

    ``method``: "robustmerge" (``density``, ``clamp_quantile``, ``lam``) or a baseline of
    :mod:`robustmerge_kernels.methods` (task_arithmetic/linear, ties, dare_linear, dare_ties,
    magnitude_prune, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd,
    magnitude_prune_svd, pcb), which take ``weights`` (one per adapter, default 1.0),
    ``density``, ``majority_sign_method``, ``svd_rank``, ``svd_clamp`` (as PEFT's
    ``add_weighted_adapter``), ``seed`` (DARE) and ``pcb_ratio``.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}; available: {', '.join(METHODS)}")
    if isinstance(adapters, (str, os.PathLike, dict)) or not isinstance(adapters, Sequence):
        raise AdapterError("adapters must be a list (of folders, state dicts, pairs or models)")
    if method == "robustmerge":
        params = RobustMergeParams(density, clamp_quantile, lam)
    else:  # baseline methods: validated by methods.check_options
        params = _methods.MethodOptions(
            tuple(weights) if weights is not None else None, density, majority_sign_method, svd_rank, svd_clamp,
            seed, pcb_ratio,
        )  # fmt: skip
        _methods.check_options(method, params, len(adapters))
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out is not None:
        check_destination(out, overwrite)

    sources: list[AdapterSource] = []
    try:
        for i, a in enumerate(adapters):
            sources.append(open_adapter(a, i))
        return _merge_sources(
            sources, method, params, out_dtype, backend, out, overwrite, progress, group_bytes, shard_bytes,
            keep_in_memory, start,
        )
    finally:
        for source in sources:
            source.close()


def _merge_sources(sources, method, params, out_dtype, backend, out, overwrite, progress, group_bytes, shard_bytes,
                   keep_in_memory, start):
    plan = build_plan(sources, out_dtype)
    if out is not None and plan.out_config is None:
        raise AdapterError("cannot write a PEFT folder: no adapter came with a LoRA config; pass (state_dict, config)")
    device = _device_of(sources, plan)
    impl = get_backend(backend, device.type)
    run = dict(plan=plan, sources=sources, impl=impl, params=params, device=device, progress=progress,
               group_bytes=group_bytes)  # fmt: skip
    if method != "robustmerge":  # baselines change ranks and config: written after merging
        run = dict(plan=plan, sources=sources, method=method, options=params, device=device, progress=progress)
    produce = _run_plan if method == "robustmerge" else _run_baseline
    if out is None:
        merged = produce(**run)
        merged.report = _report(plan, sources, impl, method, params, merged)
        merged.report.seconds = time.perf_counter() - start
        return merged

    hashes = InputHashes(sources)
    try:
        with StagedAdapter(out, overwrite) as staged:
            # Unsharded output is written as it is produced (offsets known from the plan).
            if method == "robustmerge" and not shard_bytes:
                stream = staged.stream(_output_entries(plan))
                merged = produce(**run, sink=stream.write, keep=keep_in_memory)
            else:
                merged = produce(**run)
                staged.write_tensors({k: v for k, v in merged.items() if k not in merged.files}, shard_bytes)
            merged.report = _report(plan, sources, impl, method, params, merged)
            report = {k: v for k, v in asdict(merged.report).items() if k not in ("seconds", "adapters")}
            record = build_record(sources, hashes.result(), report)
            finish_adapter(staged, merged, merged.files, merged.config, record)
            staged.commit()
        if not keep_in_memory:
            merged.clear()
    except BaseException:
        hashes.cancel()
        raise
    merged.report.seconds = time.perf_counter() - start
    return merged


def _output_entries(plan: MergePlan) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every tensor of adapter_model.safetensors, in writing order."""
    entries = []
    for m in plan.modules:
        entries.append((m.a_key, (m.rank, m.in_features), m.out_dtype))
        entries.append((m.b_key, (m.out_features, m.rank), m.out_dtype))
    entries += [(mean.key, mean.shape, mean.out_dtype) for mean in plan.means if mean.file is None]
    return entries


def _report(plan: MergePlan, sources: list[AdapterSource], impl, method: str, params, merged) -> MergeReport:
    if method == "robustmerge":  # from the plan: the tensors may already be on disk only
        numel = sum(m.rank * (m.in_features + m.out_features) for m in plan.modules)
        numel += sum(math.prod(mean.shape) for mean in plan.means)
    else:  # baselines change ranks (cat, svd)
        numel = sum(v.numel() for v in merged.values())
    return MergeReport(
        method=method,
        backend=impl.name if method == "robustmerge" else "methods",  # baselines run methods/, not a backend
        adapters=[s.label for s in sources],
        modules=len(plan.modules),
        parameters=numel,
        bytes_in=plan.bytes_in(),
        seconds=0.0,
        hyperparameters=asdict(params) if method == "robustmerge" else params.hyperparameters(method),
        partial_modules={
            m.name: [s.label for t, s in enumerate(sources) if t not in m.members] for m in plan.partial_modules()
        },
        averaged_tensors=len(plan.means),
    )


def _run_plan(plan, sources, impl, params, device, progress, group_bytes, sink=None, keep=True) -> MergedAdapter:
    """Load, merge and emit every module group, then the averaged non-LoRA tensors. Each
    result goes to ``sink`` (the output file) as it is produced, and stays in the returned
    dict when ``keep`` (tensors for files written at the end always stay)."""
    merged = MergedAdapter()
    merged.config = plan.out_config
    emit = _emitter(merged, sink, keep)
    bar = _progress_bar(len(plan.modules), progress)
    scan = not getattr(impl, "checks_finite", False)  # kernels that see inf/NaN themselves skip a pass
    if group_bytes is None:
        group_bytes = FILE_GROUP_BYTES if any(s.path is not None for s in sources) else DEFAULT_GROUP_BYTES
        if device.type == "cuda" and all(s.path is None for s in sources):
            # Inputs already resident on the GPU: one group, so one launch sequence and one
            # synchronisation per merge (the outputs, 1/T of the inputs, are allocated at once).
            group_bytes = CUDA_RESIDENT_GROUP_BYTES
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
            emit(m.a_key, a if not scan else _finite_output(m.a_key, a))
            emit(m.b_key, b if not scan else _finite_output(m.b_key, b))
        bar.update(len(group))
    bar.close()
    _add_means(emit, plan, sources, device)
    return merged


def _emitter(merged: MergedAdapter, sink=None, keep: bool = True):
    """Where each merged tensor goes: ``sink`` (the output file) as it is produced, the
    returned dict when ``keep``; tensors for another file (``file``) always stay, to be
    written at the end."""

    def emit(key: str, value: torch.Tensor, file: str | None = None) -> None:
        if file is not None:
            merged.files[key] = file
        elif sink is not None:
            sink(key, value)
        if keep or file is not None:
            merged[key] = value

    return emit


def _add_means(emit, plan, sources, device) -> None:
    """SPEC step 5: each non-LoRA tensor, averaged over its carriers, to ``emit``."""
    for mean in plan.means:
        values = [_load(sources[t], key, device) for t, key in zip(mean.members, mean.keys)]
        emit(mean.key, _finite_output(mean.key, mean_tensors(values, mean.out_dtype)), mean.file)


def _run_baseline(plan, sources, method, options, device, progress) -> MergedAdapter:
    """A baseline method (robustmerge_kernels.methods) over every module, then the means."""
    bar = _progress_bar(len(plan.modules), progress)
    tensors, config = _methods.merge_baseline(
        plan, method, options, lambda t, key: _load(sources[t], key, device), bar.update
    )
    bar.close()
    merged = MergedAdapter(tensors)
    merged.config = config
    _add_means(_emitter(merged), plan, sources, device)
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
