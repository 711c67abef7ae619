"""``analyze()``: open task adapters (and merged ones), compute every module's metrics, summarise.

Inputs are opened exactly as ``merge()`` opens them (folders, state dicts, pairs, PeftModels)
and the task adapters are validated against each other by the merge planner, so analysis
refuses what merging refuses. A merged adapter may have another rank (cat, svd) but must
carry every module of the tasks, with the same base-layer shape. Tensors are read one
module at a time; nothing dense (m x n) is formed (see :mod:`.metrics`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapter_io.keys import canonical_name, parse_factor
from ..adapter_io.scaling import ScalingRule
from ..adapter_io.sources import AdapterSource, open_adapter
from ..errors import AdapterError
from ..plan import ModulePlan, build_plan
from . import metrics
from .summary import summarise

DEFAULT_TOP_K = 4
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Analysis:
    """Everything ``analyze()`` computed. ``data`` is the JSON document (see :meth:`to_json`)."""

    data: dict[str, Any]
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # written files by kind (json, markdown, png...)

    @property
    def tasks(self) -> list[str]:
        return self.data["tasks"]

    @property
    def merged(self) -> list[str]:
        return self.data["merged"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]

    def to_json(self) -> dict[str, Any]:
        return self.data

    def markdown(self) -> str:
        from .report import markdown

        return markdown(self)

    def write(self, out: str | os.PathLike[str], plots: bool = True) -> dict[str, str]:
        """Write ``analysis.json``, ``analysis.md`` and the PNG plots into folder ``out``."""
        from .report import write_report

        self.files = write_report(self, os.fspath(out), plots)
        return self.files


def _label(obj: Any, index: int, prefix: str) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(obj))) or f"{prefix}{index}"
    return f"{prefix}{index}"


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in labels:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _scale(source: AdapterSource, key: str, rules: dict[int, ScalingRule]) -> float:
    """The adapter's own LoRA scaling for the module of ``key`` (1 without a config)."""
    if source.config is None:
        return 1.0
    rule = rules.get(id(source))
    if rule is None:
        rule = rules[id(source)] = ScalingRule(source.config)
    parsed = parse_factor(key)
    return rule(parsed.module)[2]


def _module_info(name: str) -> tuple[int | None, str]:
    m = _LAYER.search(name + ".")
    return (int(m.group(1)) if m else None), name.rsplit(".", 1)[-1]


def _merged_modules(source: AdapterSource) -> dict[str, ModulePlan]:
    plan = build_plan([source])
    return {canonical_name(m.name): m for m in plan.modules}


def analyze(
    adapters: Sequence[Any],
    merged: Sequence[Any] = (),
    *,
    labels: Sequence[str] | None = None,
    merged_labels: Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    progress: bool = False,
) -> Analysis:
    """Analyse task adapters in their low-rank space and what merged adapters keep of them.

    Args:
        adapters: the task adapters (anything ``merge()`` accepts), at least one.
        merged: merged adapters of those tasks to measure (any method, any rank).
        labels, merged_labels: names in the report (default: folder names, ``task0``...).
        top_k: the "head": the top singular directions that subspace overlap and the
            head/tail split use (clipped to the rank).
        progress: show a progress bar over modules (tqdm).

    Returns:
        An :class:`Analysis`; ``.write(folder)`` writes JSON, markdown and PNG plots.

    Raises:
        AdapterError: unreadable inputs, adapters that cannot be merged together, or a
            merged adapter lacking a module of the tasks or with another base-layer shape.
    """
    import time

    start = time.perf_counter()
    if isinstance(adapters, (str, os.PathLike, dict)) or not isinstance(adapters, Sequence) or not adapters:
        raise AdapterError("adapters must be a non-empty list (of folders, state dicts, pairs or models)")
    if isinstance(merged, (str, os.PathLike, dict)) or not isinstance(merged, Sequence):
        raise AdapterError("merged must be a list (of folders, state dicts, pairs or models)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise AdapterError(f"top_k must be a positive int, got {top_k!r}")
    task_labels = _unique(
        list(labels) if labels is not None else [_label(a, i, "task") for i, a in enumerate(adapters)]
    )
    m_labels = _unique(
        list(merged_labels) if merged_labels is not None else [_label(m, j, "merged") for j, m in enumerate(merged)]
    )
    if len(task_labels) != len(adapters) or len(m_labels) != len(merged):
        raise AdapterError("labels must name every adapter (and merged_labels every merged adapter)")

    sources: list[AdapterSource] = []
    msources: list[AdapterSource] = []
    try:
        for i, a in enumerate(adapters):
            sources.append(open_adapter(a, i))
        plan = build_plan(sources)  # the tasks must be mergeable: same shapes, ranks, configs
        for j, m in enumerate(merged):  # numbered after the tasks, as on the command line
            msources.append(open_adapter(m, len(adapters) + j))
            if msources[-1].config is None and plan.out_config is not None:
                raise AdapterError(
                    "has no LoRA config while the task adapters do, so its scaling is unknown; "
                    "pass a (state_dict, config) pair or a PEFT folder",
                    msources[-1].label,
                )
        mplans = [_merged_modules(s) for s in msources]
        # One thread: the work is many small QRs and r-wide products, which a thread pool
        # barely speeds up, and on a busy machine an oversubscribed pool made the llava-7b
        # T=8 analysis 466 s instead of 16 s (2 cores, load 10).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            modules = _analyse_modules(plan.modules, sources, msources, mplans, task_labels, m_labels, top_k, progress)
        finally:
            torch.set_num_threads(threads)
    finally:
        for s in sources + msources:
            s.close()
    data = {
        "format": "robustmerge-analysis/1",
        "tasks": task_labels,
        "merged": m_labels,
        "top_k": top_k,
        "definitions": DEFINITIONS,
        "modules": modules,
    }
    data["summary"] = summarise(data)
    return Analysis(data, time.perf_counter() - start)


def _check_merged(mod: ModulePlan, mplans, msources) -> list[ModulePlan]:
    found = []
    key = canonical_name(mod.name)
    for mp, src in zip(mplans, msources):
        other = mp.get(key)
        if other is None:
            raise AdapterError(
                f"has no LoRA factors for module {mod.name!r}, which the task adapters carry; "
                "analyse a merge of these adapters",
                src.label,
            )
        if (other.in_features, other.out_features) != (mod.in_features, mod.out_features):
            raise AdapterError(
                f"module {mod.name!r} is {other.out_features} x {other.in_features} here but "
                f"{mod.out_features} x {mod.in_features} in the task adapters (another base model?)",
                src.label,
                other.a_keys[0],
            )
        found.append(other)
    return found


def _analyse_modules(plan_modules, sources, msources, mplans, task_labels, m_labels, top_k, progress) -> list[dict]:
    rules: dict[int, ScalingRule] = {}
    out = []
    iterator = plan_modules
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(plan_modules, desc="analyse", unit="module")
    for mod in iterator:
        others = _check_merged(mod, mplans, msources)
        svds = {}
        tasks: dict[str, Any] = {}
        for t, ka, kb in zip(mod.members, mod.a_keys, mod.b_keys):
            src = sources[t]
            svd = metrics.task_svd(src.get(ka), src.get(kb), _scale(src, ka, rules))
            svds[task_labels[t]] = svd
            tasks[task_labels[t]] = metrics.spectrum_stats(svd, top_k)
        names = list(svds)
        inter = metrics.interference([svds[n] for n in names], top_k)
        merged_out: dict[str, Any] = {}
        for label, other, src in zip(m_labels, others, msources):
            a_m, b_m = src.get(other.a_keys[0]).to(torch.float64), src.get(other.b_keys[0]).to(torch.float64)
            scale_m = _scale(src, other.a_keys[0], rules)
            merged_out[label] = {n: metrics.merged_metrics(svds[n], a_m, b_m, scale_m) for n in names}
        layer, kind = _module_info(canonical_name(mod.name))
        out.append(
            {
                "name": mod.name,
                "layer": layer,
                "type": kind,
                "shape": [mod.out_features, mod.in_features],
                "rank": mod.rank,
                "tasks": tasks,
                "interference": {"tasks": names, **inter},
                "merged": merged_out,
            }
        )
    return out


DEFINITIONS = {
    "delta": "dW = c * B @ A per module, c the adapter's LoRA scaling (alpha/r or alpha/sqrt(r)); "
    "1 for state dicts without a config",
    "singular_values": "singular values of dW, exact, from QR(B), QR(A^T) and the SVD of the r x r core",
    "head_tail_gap": "mean of the top_k singular values / mean of the remaining ones",
    "energy_top": "share of ||dW||_F^2 in the top_k singular values",
    "cosine": "<dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F), computed in the low-rank space",
    "overlap_left/right": "||U_i^T U_j||_F^2 / top_k for the top_k left (output) / right (input) singular "
    "vectors: mean squared cosine of the principal angles, 0 = orthogonal, 1 = same subspace",
    "direction": "per task and singular index i: |u_i^T M v_i| / ||M v_i||, the |cos| between the task's "
    "output direction u_i and what the merged delta M makes of its input direction v_i",
    "retention": "per task and singular index i: u_i^T M v_i / s_i, the singular value retention ratio "
    "(1 = kept, 0 = lost, < 0 = reversed, > 1 = amplified)",
    "coefficient": "<M, dW>_F / ||dW||_F^2, the projection coefficient of the merged delta on the task's",
    "adapter_cosine": "the cosine of whole adapters: module inner products summed over modules",
}
