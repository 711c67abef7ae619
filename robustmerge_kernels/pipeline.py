"""How a merge runs once its inputs are planned: one run object per kind of method.

:class:`RobustMergeRun` hands groups of modules to a backend (docs/ALGORITHM.md §3, steps
1-4) and emits each merged tensor as it is produced, so the output can stream to disk and
memory stays bounded by a group. :class:`BaselineRun` runs a baseline method of
:mod:`robustmerge_kernels.methods` (§4), which may change ranks and the config, so its
output is written after merging. Both end with the element-wise means of the non-LoRA
tensors (§3 step 5).

Every merged tensor goes through an :class:`Emitter`: to the output file (``sink``) when
one is open, and into the returned dict when the caller keeps tensors in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict
from typing import Any

import torch

from . import methods as _methods
from .adapter_io.sources import AdapterSource
from .backends import Backend, ModuleInputs, NonFiniteInput, OutputOverflow, get_backend
from .errors import AdapterError
from .finite import check_output, refuse_overflow, require_finite
from .means import mean_of_sources
from .params import RobustMergeParams
from .plan import MeanPlan, MergePlan, ModulePlan

# Modules are handed to the backend in groups of about this many input bytes: large enough
# for a fused kernel to fill the machine, small enough to bound memory by a working set.
# Inputs read from files are copied into memory per group, and the next group is read
# while the current one merges (two groups in flight), so their groups are smaller.
DEFAULT_GROUP_BYTES = 256 << 20
CUDA_RESIDENT_GROUP_BYTES = 1 << 62  # the whole plan
ENV_PREFETCH = "ROBUSTMERGE_PREFETCH"
FILE_GROUP_BYTES = 32 << 20

Sink = Callable[[str, torch.Tensor], None]
OutputEntry = tuple[str, tuple[int, ...], torch.dtype]


def merge_device(sources: list[AdapterSource], plan: MergePlan) -> torch.device:
    """Merge where the inputs are: the device of the first tensor (files load to CPU)."""
    if sources[0].path is not None or not plan.modules:
        return torch.device("cpu")
    return sources[0].get(plan.modules[0].a_keys[0]).device


def load(source: AdapterSource, key: str, device: torch.device, check_finite: bool = True) -> torch.Tensor:
    x = source.get(key)
    if check_finite:
        require_finite(x, source.label, key)
    return x.to(device)


def module_groups(modules: list[ModulePlan], group_bytes: int) -> Iterator[list[ModulePlan]]:
    """Consecutive modules in groups of at most ``group_bytes`` input bytes (a module larger
    than that is a group of its own)."""
    group, size = [], 0
    for m in modules:
        if group and size + m.nbytes_in > group_bytes:
            yield group
            group, size = [], 0
        group.append(m)
        size += m.nbytes_in
    if group:
        yield group


class Prefetcher:
    """Yield ``(item, load(item))`` for each item, loading the next item on a background
    thread while the caller works on the current one. File reads (preadv) and the kernels
    release the GIL, so reading group i + 1 overlaps merging group i; at most two loaded
    items exist at once. With ``enabled=False`` it loads in the caller's thread."""

    def __init__(self, load: Callable[[Any], Any], items: Sequence[Any], enabled: bool = True):
        self._load, self._items, self._enabled = load, items, enabled
        self._pool: ThreadPoolExecutor | None = None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self._enabled or len(self._items) < 2:
            for item in self._items:
                yield item, self._load(item)
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustmerge-prefetch")
        try:
            pending: Future = self._pool.submit(self._load, self._items[0])
            for i, item in enumerate(self._items):
                loaded = pending.result()  # re-raises the loader's error here, in order
                if i + 1 < len(self._items):
                    pending = self._pool.submit(self._load, self._items[i + 1])
                yield item, loaded
        finally:
            # Never leave a read running after the caller stops (the sources close next).
            self._pool.shutdown(wait=True, cancel_futures=True)


class Emitter:
    """Where each merged tensor goes: ``sink`` (the output file) as it is produced, the
    ``target`` dict when ``keep``. Tensors for another file (``file``, e.g. the projector
    of an original LLaVA checkpoint) always stay in ``target``, to be written at the end,
    and are listed in ``files``."""

    def __init__(self, target: dict[str, torch.Tensor], files: dict[str, str], sink: Sink | None, keep: bool):
        self.target, self.files, self.sink, self.keep = target, files, sink, keep

    def __call__(self, key: str, value: torch.Tensor, file: str | None = None) -> None:
        if file is not None:
            self.files[key] = file
        elif self.sink is not None:
            self.sink(key, value)
        if self.keep or file is not None:
            self.target[key] = value


def emit_means(
    emit: Emitter,
    plan: MergePlan,
    sources: list[AdapterSource],
    device: torch.device,
    means: list[MeanPlan] | None = None,
) -> None:
    """§3 step 5: each non-LoRA tensor (of ``means``, default all), averaged over the
    adapters that carry it."""
    for mean in plan.means if means is None else means:  # streamed: one chunk of one adapter's copy at a time
        emit(mean.key, check_output(mean.key, mean_of_sources(mean, sources, device)), mean.file)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="module", desc="merging", leave=False)


class RobustMergeRun:
    """RobustMerge over every module group on one backend; output shapes are the inputs',
    so every output tensor is known before merging and the output can stream."""

    method = "robustmerge"
    streams = True  # output entries are known up front (see output_entries)

    def __init__(
        self,
        plan: MergePlan,
        sources: list[AdapterSource],
        params: RobustMergeParams,
        backend: str,
        device: torch.device,
        progress: bool = False,
        group_bytes: int | None = None,
        share: tuple[list[ModulePlan], list[MeanPlan]] | None = None,
    ):
        """``share``: merge only these modules and means (one rank's part of a distributed
        merge, robustmerge_kernels.distributed); default the whole plan."""
        self.plan, self.sources, self.params, self.device, self.progress = plan, sources, params, device, progress
        self.modules, self.means = share if share is not None else (plan.modules, plan.means)
        self.impl: Backend = get_backend(backend, device.type)
        self.from_files = any(s.path is not None for s in sources)  # in memory, "loading" costs nothing
        if group_bytes is None:
            group_bytes = FILE_GROUP_BYTES if self.from_files else DEFAULT_GROUP_BYTES
            if device.type == "cuda" and not self.from_files:
                # Inputs already resident on the GPU: one group, so one launch sequence and one
                # synchronisation per merge (the outputs, 1/T of the inputs, are allocated at once).
                group_bytes = CUDA_RESIDENT_GROUP_BYTES
        self.group_bytes = group_bytes
        self.config = plan.out_config

    @property
    def backend_name(self) -> str:
        return self.impl.name

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.params)

    def output_entries(self) -> list[OutputEntry]:
        """(key, shape, dtype) of every tensor of adapter_model.safetensors, in writing order."""
        entries: list[OutputEntry] = []
        for m in self.plan.modules:
            entries.append((m.a_key, (m.rank, m.in_features), m.out_dtype))
            entries.append((m.b_key, (m.out_features, m.rank), m.out_dtype))
        entries += [(mean.key, mean.shape, mean.out_dtype) for mean in self.plan.means if mean.file is None]
        return entries

    def parameters(self, merged: dict[str, torch.Tensor]) -> int:
        """Elements of the merged adapter, from the plan (the tensors may be on disk only)."""
        numel = sum(m.numel for m in self.plan.modules)
        return numel + sum(math.prod(mean.shape) for mean in self.plan.means)

    def produce(self, emit: Emitter) -> None:
        bar = progress_bar(len(self.modules), self.progress)
        scan = not getattr(self.impl, "checks_finite", False)  # kernels that see inf/NaN themselves skip a pass
        groups = list(module_groups(self.modules, self.group_bytes))
        # Read ahead from files only; ROBUSTMERGE_PREFETCH=0 reads in line (to measure).
        prefetch = self.from_files and os.environ.get(ENV_PREFETCH, "1") != "0"
        loaded = iter(Prefetcher(lambda g: self._load_group(g, scan), groups, enabled=prefetch))
        with closing(loaded):  # on any error, the background read ends before the sources close
            for group, inputs in loaded:
                results = self._merge_group(inputs)
                for m, (a, b) in zip(group, results):
                    emit(m.a_key, check_output(m.a_key, a) if scan else a)
                    emit(m.b_key, check_output(m.b_key, b) if scan else b)
                bar.update(len(group))
        bar.close()
        emit_means(emit, self.plan, self.sources, self.device, self.means)

    def _load_group(self, group: list[ModulePlan], scan: bool) -> list[ModuleInputs]:
        src = self.sources
        direct = None if scan else self._resident()
        if direct is not None:  # what load() returns, without a call per tensor
            return [
                ModuleInputs(
                    m,
                    [direct[t][k] for t, k in zip(m.members, m.a_keys)],
                    [direct[t][k] for t, k in zip(m.members, m.b_keys)],
                )
                for m in group
            ]
        return [
            ModuleInputs(
                m,
                [load(src[t], k, self.device, scan) for t, k in zip(m.members, m.a_keys)],
                [load(src[t], k, self.device, scan) for t, k in zip(m.members, m.b_keys)],
            )
            for m in group
        ]

    def _resident(self) -> list[dict[str, torch.Tensor]] | None:
        """Each source's tensors when every source is a state dict already on the merge
        device: then load() (without the finiteness scan) is a dict lookup returning the
        tensor itself (Tensor.to returns self on its own device), so the lookups suffice."""
        if self.from_files or any(s.tensors is None or s.device != self.device for s in self.sources):
            return None
        return [s.tensors for s in self.sources]

    def _merge_group(self, inputs: list[ModuleInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        src = self.sources
        try:
            return self.impl.robustmerge(inputs, self.params)
        except NonFiniteInput as exc:  # name the adapter and tensor, with the full count
            t = exc.plan.members[exc.member]
            key = (exc.plan.a_keys if exc.factor == "A" else exc.plan.b_keys)[exc.member]
            require_finite(src[t].get(key), src[t].label, key)
            raise AdapterError("contains NaN/Inf values", src[t].label, key) from exc
        except OutputOverflow as exc:
            refuse_overflow(exc.plan.a_key if exc.factor == "A" else exc.plan.b_key, exc.plan.out_dtype)


class BaselineRun:
    """A baseline method over every module; it may change ranks (cat, svd) and writes its
    own config (lora_alpha = r), so the output is written after merging."""

    streams = False
    backend_name = "methods"  # baselines run robustmerge_kernels.methods, not a backend

    def __init__(
        self,
        plan: MergePlan,
        sources: list[AdapterSource],
        method: str,
        options: _methods.MethodOptions,
        device: torch.device,
        progress: bool = False,
    ):
        self.plan, self.sources, self.method, self.options = plan, sources, method, options
        self.device, self.progress = device, progress
        self.config: dict[str, Any] | None = None  # known after produce()

    def hyperparameters(self) -> dict[str, Any]:
        return self.options.hyperparameters(self.method)

    def parameters(self, merged: dict[str, torch.Tensor]) -> int:
        return sum(v.numel() for v in merged.values())

    def produce(self, emit: Emitter) -> None:
        bar = progress_bar(len(self.plan.modules), self.progress)
        tensors, self.config = _methods.merge_baseline(
            self.plan, self.method, self.options, lambda t, key: load(self.sources[t], key, self.device), bar.update
        )
        bar.close()
        for key, value in tensors.items():
            emit(key, value)
        emit_means(emit, self.plan, self.sources, self.device)
