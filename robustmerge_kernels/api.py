"""``merge()``: the one public entry point behind the Python API and the CLI.

This module validates options, opens the inputs and decides where the output goes (memory,
or a staged folder, streamed or written at the end); :mod:`.pipeline` runs the merge.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import methods as _methods
from .adapter_io import hub
from .adapter_io.model_config import ModelConfig, choose_model_config, write_model_config
from .adapter_io.names import MODEL_CONFIG_NAME, SAFETENSORS_NAME
from .adapter_io.record import InputHashes, build_record
from .adapter_io.safetensors_io import SafetensorsStream
from .adapter_io.sources import AdapterSource, is_peft_model, open_adapter, open_peft_adapter, warn_repeated_folders
from .adapter_io.writer import StagedAdapter, check_destination, finish_adapter
from .dtypes import parse_dtype
from .errors import AdapterError
from .params import RobustMergeParams
from .pipeline import BaselineRun, Emitter, RobustMergeRun, Sink, merge_device
from .plan import MergePlan, build_plan

METHODS = ("robustmerge", *_methods.METHODS)  # baselines: robustmerge_kernels.methods

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
    if not math.isfinite(value) or value < 1:
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
    output_dtypes: dict[str, str] = field(default_factory=dict)  # "lora_factors"/"averaged" -> dtype
    model_config: dict[str, Any] = field(default_factory=dict)  # config.json carried over (LLaVA folders)
    layout: str | None = None  # LLaVA layout of every output key: original, hf, hf_legacy (None: no LLaVA names)

    def summary(self) -> str:
        line = (
            f"merged {len(self.adapters)} adapters with {self.method}: {self.modules} modules, "
            f"{_count(self.parameters)} parameters, {self.seconds:.2f} s, backend {self.backend}"
        )
        if self.averaged_tensors:
            line += f", {self.averaged_tensors} non-LoRA tensors averaged"
        if self.partial_modules:
            line += f", {len(self.partial_modules)} modules missing from some adapters"
        if self.model_config.get("differs"):
            line += (
                f", config.json from {self.model_config['from']} (differs in {', '.join(self.model_config['differs'])})"
            )
        if self.output_dtypes.get("lora_factors"):
            line += f", written as {self.output_dtypes['lora_factors']}"
        return line


def _count(n: int) -> str:
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


Run = RobustMergeRun | BaselineRun


class MergedAdapter(dict):
    """The merged state dict (PEFT saved-key form), with ``config`` and ``report`` attached.

    ``files`` maps the keys that belong in a file other than adapter_model.safetensors
    (the mm_projector of an original LLaVA checkpoint: non_lora_trainables.bin) to it.
    """

    config: dict[str, Any] | None
    report: MergeReport

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.files: dict[str, str] = {}
        self.config = None


def merge(
    adapters: Sequence[Any],
    method: str = "robustmerge",
    density: float = 0.2,
    clamp_quantile: float = 0.8,
    lam: float = 2.0,
    backend: str = "auto",
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool | str = False,
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
    distributed: bool = False,
    adapter_names: Sequence[str] | None = None,
    push_to_hub: str | None = None,
) -> MergedAdapter:
    """Merge LoRA adapters into one adapter (RobustMerge by default, docs/ALGORITHM.md).

    Args:
        adapters: PEFT adapter folders, Hugging Face Hub ids (``org/name``,
            ``org/name@revision``, ``org/name/subfolder``; through huggingface_hub's cache,
            ``HF_HUB_OFFLINE=1`` for the cache only), state dicts,
            ``(state_dict, LoraConfig-or-dict)`` pairs or ``PeftModel`` objects (their
            active adapter), in any mix; or one ``PeftModel`` with ``adapter_names``.
        method: ``"robustmerge"`` or a baseline of :mod:`robustmerge_kernels.methods`:
            task_arithmetic/linear, ties, dare_linear, dare_ties, magnitude_prune, cat, svd,
            ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd, pcb.
        density: fraction of each matrix kept (RobustMerge; ties, dare_*, magnitude_prune).
        clamp_quantile: RobustMerge's per-task lower clamp of the A-row scales.
        lam: RobustMerge's fusion weight, applied to the merged A and B.
        backend: ``"auto"`` (the fastest available for the inputs' device;
            ``$ROBUSTMERGE_BACKEND`` overrides it), ``"cpu"``, ``"cuda"``, ``"triton"`` or
            ``"reference"``. Used by RobustMerge only; baselines run on torch.
        out: write the result there as a PEFT adapter folder, atomically.
        dtype: output dtype of every tensor (``"fp32"``, ``"bf16"``, a ``torch.dtype``). Default:
            LoRA factors of float16/bfloat16 inputs in float32 (as the official RobustMerge
            code), of float32/float64 inputs in their dtype; averaged non-LoRA tensors (the
            projector) in their first carrier's dtype.
        overwrite: replace an existing ``out`` that is an adapter folder (``"force"``: any folder).
        progress: show a progress bar over modules.
        group_bytes: input bytes handed to the backend at once (default 256 MB in memory,
            32 MB from files, two groups in flight): the working set of a merge.
        max_shard_size: bytes or ``"5GB"``: split larger weights into indexed shards (peft
            0.21 cannot load those; one file is the default).
        weights, majority_sign_method, svd_rank, svd_clamp: baseline options, named and
            meant as in PEFT's ``add_weighted_adapter`` (one weight per adapter, default 1.0).
        seed: DARE's hashed random drop.
        pcb_ratio: PCB's fraction of balanced entries kept.
        keep_in_memory: with ``out`` and RobustMerge, ``False`` returns no tensors (only
            ``config`` and ``report``): the output streams to disk and is never held whole.
        distributed: merge across the ranks of the initialised torch.distributed group
            (RobustMerge, with ``out``): each rank merges a byte-balanced share of the
            modules on its device and writes it into the one output file
            (:mod:`robustmerge_kernels.distributed`); every rank gets the same report and,
            with ``keep_in_memory``, the tensors it merged.
        adapter_names: merge these named adapters of the one ``PeftModel`` given as
            ``adapters`` (see also :func:`robustmerge_kernels.add_merged_adapter`).
        push_to_hub: with ``out``, upload the written folder to this Hub repository
            (created if needed), with a model card listing inputs, method and options.

    Returns:
        The merged state dict (keys as PEFT saves them) with ``.config`` (the output
        ``adapter_config.json``), ``.report`` (a :class:`MergeReport`) and ``.files`` (keys
        that belong in another file, e.g. ``non_lora_trainables.bin``).

    Raises:
        AdapterError: bad input or options, naming the adapter, tensor and reason.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}; available: {', '.join(METHODS)}")
    if adapter_names is not None:
        adapters = _named_adapters(adapters, adapter_names)
    elif isinstance(adapters, (str, os.PathLike, dict)) or not isinstance(adapters, Sequence):
        raise AdapterError("adapters must be a list (of folders, Hub ids, state dicts, pairs or models)")
    if push_to_hub is not None and (out is None or distributed):
        raise AdapterError("push_to_hub uploads the written folder: pass out= (and not distributed=True)")
    params: RobustMergeParams | _methods.MethodOptions
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
    ranks = None
    if distributed:
        from . import distributed as _dist

        if method != "robustmerge" or out is None or shard_bytes:
            raise AdapterError(
                "distributed=True merges with method='robustmerge' into one output file: pass out= "
                "(and no max_shard_size)"
            )
        ranks = _dist.current()
    if out is not None and (ranks is None or ranks.rank == 0):
        # overwrite: False, True (an adapter folder) or "force" (any folder)
        inputs = [a for a in adapters if isinstance(a, (str, os.PathLike))]
        check_destination(out, bool(overwrite), inputs, force=overwrite == "force")

    sources: list[AdapterSource] = []
    try:
        for i, a in enumerate(adapters):
            sources.append(a if isinstance(a, AdapterSource) else open_adapter(a, i))
        warn_repeated_folders(sources)
        plan = build_plan(sources, out_dtype)
        model_config = choose_model_config(sources)
        if out is not None and plan.out_config is None:
            raise AdapterError(
                "cannot write a PEFT folder: no adapter came with a LoRA config; pass (state_dict, config)"
            )
        device = merge_device(sources, plan) if ranks is None else ranks.device
        run: Run
        if ranks is not None:
            share = _dist.share_of(plan, ranks)
            run = RobustMergeRun(
                plan, sources, params, backend, device, progress, group_bytes, (share.modules, share.means)
            )
            merged = _write_distributed(run, method, out, overwrite, keep_in_memory, ranks, share, model_config)
        else:
            if isinstance(params, RobustMergeParams):
                run = RobustMergeRun(plan, sources, params, backend, device, progress, group_bytes)
            else:
                run = BaselineRun(plan, sources, method, params, device, progress)
            if out is None:
                merged = _produce(run)
                merged.report = _report(run, method, merged, model_config)
            else:
                merged = _write(run, method, out, overwrite, shard_bytes, keep_in_memory, model_config, push_to_hub)
    finally:
        for source in sources:
            source.close()
    merged.report.seconds = time.perf_counter() - start
    return merged


def _produce(run: Run, sink: Sink | None = None, keep: bool = True) -> MergedAdapter:
    merged = MergedAdapter()
    run.produce(Emitter(merged, merged.files, sink, keep))
    merged.config = run.config
    return merged


def _write(
    run: Run,
    method: str,
    out: str | os.PathLike[str],
    overwrite: bool | str,
    shard_bytes: int | None,
    keep: bool,
    model_config: ModelConfig | None = None,
    push_to_hub: str | None = None,
) -> MergedAdapter:
    """Merge into a staged folder and rename it into place; the record hashes the inputs on
    a background thread meanwhile."""
    hashes = InputHashes(run.sources)
    try:
        with StagedAdapter(out, overwrite) as staged:
            if run.streams and not shard_bytes:  # offsets known from the plan: write as produced
                stream = staged.stream(run.output_entries())
                merged = _produce(run, sink=stream.write, keep=keep)
            else:
                merged = _produce(run)
                staged.write_tensors({k: v for k, v in merged.items() if k not in merged.files}, shard_bytes)
            merged.report = _report(run, method, merged, model_config)
            record = _finish_folder(staged, run, merged, hashes.result(), model_config)
            if push_to_hub is not None:  # the card is part of the folder before it appears
                staged.write_text(hub.CARD_NAME, hub.model_card(push_to_hub, record))
            path = staged.commit()
    except BaseException:
        hashes.cancel()
        raise
    if push_to_hub is not None:
        hub.push(path, push_to_hub, record)
    if not keep:
        merged.clear()
    return merged


def _finish_folder(
    staged: StagedAdapter,
    run: Run,
    merged: MergedAdapter,
    hashes: dict[int, dict[str, str]],
    model_config: ModelConfig | None,
    **record_extra: Any,
) -> dict[str, Any]:
    """Everything beside the weights: other-format tensors, the config, LLaVA's config.json
    (its load_pretrained_model reads it from the folder) and the merge record, returned."""
    report = {k: v for k, v in asdict(merged.report).items() if k not in ("seconds", "adapters")}
    record = build_record(run.sources, hashes, {**report, **record_extra})
    finish_adapter(staged, merged, merged.files, merged.config, record)
    if model_config is not None:
        write_model_config(staged.path(MODEL_CONFIG_NAME), model_config)
    return record


def _named_adapters(model: Any, names: Sequence[str]) -> list[AdapterSource]:
    """The named adapters of one PeftModel, as sources (labels name the adapter)."""
    if not is_peft_model(model):
        raise AdapterError("adapter_names selects adapters of a PeftModel: pass the model itself as adapters")
    if isinstance(names, str) or not names:
        raise AdapterError(f"adapter_names must be a non-empty list of adapter names, got {names!r}")
    return [open_peft_adapter(model, name, f"#{i} ({name})") for i, name in enumerate(names)]


def _report(run: Run, method: str, merged: MergedAdapter, model_config: ModelConfig | None = None) -> MergeReport:
    plan: MergePlan = run.plan
    return MergeReport(
        method=method,
        backend=run.backend_name,
        adapters=[s.label for s in run.sources],
        modules=len(plan.modules),
        parameters=run.parameters(merged),
        bytes_in=plan.bytes_in(),
        seconds=0.0,
        hyperparameters=run.hyperparameters(),
        partial_modules={
            m.name: [s.label for t, s in enumerate(run.sources) if t not in m.members] for m in plan.partial_modules()
        },
        averaged_tensors=len(plan.means),
        output_dtypes=plan.output_dtypes(),
        layout=plan.layout,
        model_config=model_config.summary() if model_config is not None else {},
    )


def _write_distributed(
    run: RobustMergeRun,
    method: str,
    out: str | os.PathLike[str],
    overwrite: bool | str,
    keep: bool,
    ranks,
    share,
    model_config: ModelConfig | None = None,
) -> MergedAdapter:
    """This rank's part of a distributed merge into one file (robustmerge_kernels.distributed):
    rank 0 stages the folder and the pre-sized file, every rank writes its share into it and
    fsyncs, and rank 0 commits only when no rank failed. Any failure fails every rank."""
    from . import distributed as _dist

    digests = _dist.all_gather(_dist.plan_digest(run.plan))
    if len(set(digests)) != 1:
        bad = next(r for r, d in enumerate(digests) if d != digests[0])
        raise AdapterError(f"rank {bad} planned a different merge than rank 0 (do all ranks see the same input files?)")
    hashes = InputHashes(run.sources, share.sources)
    staged = None
    error = None
    try:
        if ranks.rank == 0:
            try:
                staged = StagedAdapter(out, overwrite)
                stream = staged.stream(run.output_entries(), expect=share.keys())
                path = staged.path(SAFETENSORS_NAME)
            except BaseException as exc:  # every rank must learn that there is nowhere to write
                _dist.broadcast((None, f"rank 0: {exc}"))
                raise
            _dist.broadcast((path, None))
        else:
            path, error = _dist.broadcast(None)
            if error:
                raise AdapterError(f"cannot stage the output ({error})")
            stream = SafetensorsStream(path, run.output_entries(), create=False, expect=share.keys())
        local: Exception | None = None
        try:
            merged = _produce(run, sink=stream.write, keep=keep)
            stream.close()  # fsync: this rank's bytes are on disk before rank 0 commits
        except Exception as exc:  # reported to every rank below, then re-raised here
            local = exc
        error = _dist.first_error(_dist.all_gather(None if local is None else f"rank {ranks.rank}: {local}"))
        if local is not None:
            raise local
        if error is not None:
            raise AdapterError(f"distributed merge failed ({error}); nothing was written")
        merged.report = _report(run, method, merged, model_config)
        all_hashes: dict[int, dict[str, str]] = {}
        for part in _dist.all_gather(hashes.result()):
            all_hashes.update(part)
        commit_error = None
        if ranks.rank == 0:
            try:
                _finish_folder(staged, run, merged, all_hashes, model_config, ranks=ranks.world)
                staged.commit()
            except BaseException as exc:
                commit_error = f"rank 0: {exc!r}"
                raise
            finally:
                _dist.broadcast(commit_error)
        else:
            commit_error = _dist.broadcast(None)
            if commit_error:
                raise AdapterError(f"distributed merge failed at commit ({commit_error})")
    except BaseException:
        hashes.cancel()
        if staged is not None:
            staged.abort()
        raise
    if not keep:
        merged.clear()
    return merged
