"""The merge plan: every module of every adapter in one flat, validated description.

Planning reads only tensor headers (names, shapes, dtypes) and configs. It pairs each
module's ``lora_A`` with its ``lora_B`` by module name (never by key order), checks that
all adapters agree on shapes, and computes per (adapter, module) the ratio folded into B
so every adapter is expressed in the output adapter's scaling.

Compiled backends turn groups of modules into flat plan tables (backends/tables.py), so
a kernel launches once over a whole group instead of looping over tensors in Python.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .adapter_io.keys import (
    ORIGINAL_LAYOUT,
    ORIGINAL_PROJECTOR,
    PEFT_PREFIX,
    FactorKey,
    canonical_name,
    layout_of,
    output_name,
    parse_factor,
    unsupported_lora_part,
)  # fmt: skip
from .adapter_io.names import NON_LORA_NAME
from .adapter_io.scaling import ScalingRule, check_config
from .adapter_io.sources import AdapterSource
from .dtypes import default_factor_dtype, dtype_name
from .errors import AdapterError

MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ModulePlan:
    """One adapted module and the adapters that carry it (``members``, in input order)."""

    name: str
    a_key: str  # output key of the merged A
    b_key: str
    rank: int
    in_features: int  # columns of A
    out_features: int  # rows of B
    members: tuple[int, ...]
    a_keys: tuple[str, ...]  # per member, the key in that adapter's source
    b_keys: tuple[str, ...]
    b_scale: tuple[float, ...]  # per member: its scaling / the output scaling
    out_dtype: torch.dtype  # dtype=, else the first carrier's (float32 for fp16/bf16)
    nbytes_in: int  # bytes of all members' A and B

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class MeanPlan:
    """A non-LoRA tensor (projector, modules_to_save, bias): mean over its members."""

    key: str  # output key (the first member's spelling)
    shape: tuple[int, ...]
    members: tuple[int, ...]
    keys: tuple[str, ...]  # per member, the key in that adapter (LLaVA layouts differ)
    out_dtype: torch.dtype
    file: str | None = None  # written to this file beside the adapter (non_lora_trainables.bin)


@dataclass
class MergePlan:
    sources: list[AdapterSource]
    modules: list[ModulePlan]
    means: list[MeanPlan]
    out_config: dict[str, Any] | None
    layout: str | None = None  # the LLaVA layout every output key is spelled in (keys.py)

    def bytes_in(self) -> int:
        return sum(m.nbytes_in for m in self.modules)

    def partial_modules(self) -> list[ModulePlan]:
        """Modules that some adapters do not carry (merged over those that do)."""
        return [m for m in self.modules if len(m.members) < len(self.sources)]

    def output_dtypes(self) -> dict[str, str]:
        """The dtype(s) written, for the report and robustmerge.json: LoRA factors and
        averaged non-LoRA tensors (several dtypes, when modules differ, comma-joined)."""

        def names(dtypes):
            return ",".join(dict.fromkeys(dtype_name(d) for d in dtypes))

        out = {"lora_factors": names(m.out_dtype for m in self.modules)}
        if self.means:
            out["averaged"] = names(m.out_dtype for m in self.means)
        return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class _Keys:
    """What an adapter's key list alone determines (shared, read-only: see _collect)."""

    factors: dict[str, dict[str, tuple[str, FactorKey]]]  # canonical module -> {"A"/"B": (key, parsed)}
    others: dict[str, str]  # canonical key -> key, for the non-LoRA tensors
    unpaired: tuple[str, str, str] | None  # the first (module, factor, key) without its other factor
    layout: str | None  # the first key's LLaVA layout name, in key order


class _KeyProblem(Exception):
    """A key list that cannot be planned: (reason, key); _collect names the adapter."""


def _collect(source: AdapterSource) -> _Keys:
    """Split one adapter's keys into {canonical module: {"A"/"B": (key, parsed)}} and
    {canonical key: key} for the other tensors. Canonical names pair LLaVA layouts."""
    try:
        return _collect_keys(tuple(source.keys()))
    except _KeyProblem as problem:
        reason, key = problem.args
        raise AdapterError(reason, source.label, key) from None


# The result depends on the key list only, and T adapters of one model have the same key
# list, merge after merge: it is remembered per key list (shapes and dtypes are not part
# of it; they are read anew by every plan). Failures are not remembered.
@lru_cache(maxsize=32)
def _collect_keys(keys: tuple[str, ...]) -> _Keys:
    factors: dict[str, dict[str, tuple[str, FactorKey]]] = {}
    others: dict[str, str] = {}
    for key in keys:
        parsed = parse_factor(key)
        if parsed is None:
            part = unsupported_lora_part(key)
            if part is not None:
                raise _KeyProblem(
                    f"unsupported LoRA tensor {part!r} (DoRA magnitudes, LoRA biases and other "
                    "variants are not defined by RobustMerge)",
                    key,
                )
            canonical = canonical_name(key)
            if canonical in others:
                raise _KeyProblem(f"duplicate tensor (also {others[canonical]!r})", key)
            others[canonical] = key
            continue
        slot = factors.setdefault(canonical_name(parsed.module), {})
        if parsed.factor in slot:
            raise _KeyProblem(
                f"duplicate lora_{parsed.factor} for module {parsed.module!r} (also {slot[parsed.factor][0]!r})", key
            )
        slot[parsed.factor] = (key, parsed)
    unpaired = next(
        (
            (module, factor, slot[factor][0])
            for module, slot in factors.items()
            for factor, other in (("A", "B"), ("B", "A"))
            if factor in slot and other not in slot
        ),
        None,
    )
    layout = next((found for found in map(layout_of, keys) if found is not None), None)
    return _Keys(factors, others, unpaired, layout)


def _check_dtype(source: AdapterSource, key: str) -> torch.dtype:
    dtype = source.dtype(key)
    if dtype not in MERGEABLE_DTYPES:
        raise AdapterError(f"dtype {dtype} is not a floating-point type this library merges", source.label, key)
    return dtype


def _output_config(sources: list[AdapterSource]) -> dict[str, Any] | None:
    """The first adapter's config, with target_modules widened to what all adapters target."""
    with_config = [s for s in sources if s.config is not None]
    if not with_config:
        return None
    if len(with_config) != len(sources):
        missing = next(s for s in sources if s.config is None)
        raise AdapterError(
            "has no LoRA config while other adapters do, so its scaling is unknown; pass a (state_dict, config) pair",
            missing.label,
        )
    for s in sources:
        check_config(s.config, s.label)
    out = dict(with_config[0].config)
    targets = [s.config.get("target_modules") for s in sources]
    if all(isinstance(t, (list, tuple, set)) for t in targets):
        out["target_modules"] = sorted({m for t in targets for m in t})
    elif any(t != targets[0] for t in targets):
        raise AdapterError(
            f"target_modules {targets[0]!r} and {next(t for t in targets if t != targets[0])!r} cannot be "
            "combined (one is a regular expression)",
            sources[0].label,
        )
    out["inference_mode"] = True
    return out


def build_plan(sources: list[AdapterSource], dtype: torch.dtype | None = None) -> MergePlan:
    """Validate all adapters against each other and describe the merge. Reads no tensor data."""
    if not sources:
        raise AdapterError("no adapters given; merging needs at least one")
    out_config = _output_config(sources)
    per_source = [_collect(s) for s in sources]

    for t, keys in enumerate(per_source):
        if not keys.factors:
            raise AdapterError("contains no lora_A/lora_B tensors; is it a LoRA adapter?", sources[t].label)
        if keys.unpaired is not None:
            module, factor, key = keys.unpaired
            other = "B" if factor == "A" else "A"
            raise AdapterError(
                f"lora_{factor} of module {module!r} has no matching lora_{other}", sources[t].label, key
            )

    layout = output_layout(per_source)
    rules = None
    if out_config is not None:
        rules = [ScalingRule(s.config) for s in sources], ScalingRule(out_config)
    if _uniform(sources, per_source):
        modules = _plan_uniform(per_source[0].factors, sources, rules, dtype, layout)
    else:
        module_members: dict[str, list[int]] = {}
        for t, keys in enumerate(per_source):
            for module in keys.factors:
                module_members.setdefault(module, []).append(t)
        modules = [
            _plan_module(name, members, sources, [per_source[t].factors[name] for t in members], rules, dtype, layout)
            for name, members in module_members.items()
        ]
    means = _plan_means(sources, [keys.others for keys in per_source], dtype, layout)
    return MergePlan(sources, modules, means, out_config, layout)


def output_layout(per_source: list[_Keys]) -> str | None:
    """The first adapter's LLaVA layout (the first that has a layout name, in input order):
    every output key is spelled in it, so a module that only a later adapter of another
    layout carries does not land under a name the loader of the output does not know."""
    return next((keys.layout for keys in per_source if keys.layout is not None), None)


def _uniform(sources: list[AdapterSource], per_source: list[_Keys]) -> bool:
    """Whether every adapter has the same keys, shapes and dtypes (the usual merge of T
    fine-tunes of one model): then every check of _plan_module gives the same answer for
    each adapter, and a module is planned from the first one (_plan_uniform)."""
    first = per_source[0]
    if any(keys is not first for keys in per_source):  # one key list, one cached _Keys
        return False
    shapes, dtypes = sources[0].all_shapes(), sources[0].all_dtypes()
    return all(s.all_shapes() == shapes and s.all_dtypes() == dtypes for s in sources[1:])


def _plan_uniform(factors, sources, rules, dtype, layout) -> list[ModulePlan]:
    """_plan_module for every module of uniform adapters (_uniform), checking each module
    once instead of once per adapter. A module that fails any check is handed to
    _plan_module, which raises the error it always raised, naming the same adapter."""
    members = tuple(range(len(sources)))
    first = sources[0]
    scales = _constant_scales(rules)
    modules = []
    for name, slot in factors.items():
        (ka, pa), (kb, _) = slot["A"], slot["B"]
        sa, sb = first.shape(ka), first.shape(kb)
        da, db = first.dtype(ka), first.dtype(kb)
        planned = None
        if (
            len(sa) == len(sb) == 2
            and da in MERGEABLE_DTYPES
            and db in MERGEABLE_DTYPES
            and sa[0] == sb[1]
            and 0 not in sa
            and 0 not in sb
        ):
            out_module = output_name(name, pa.module, layout)  # as _plan_module: the first spelling
            b_scale = _uniform_scales(rules, scales, pa.module, out_module, sa[0], len(members))
            if b_scale is not None:
                a_key, b_key = _saved_keys(out_module, pa.embedding)
                planned = ModulePlan(
                    name=out_module,
                    a_key=a_key,
                    b_key=b_key,
                    rank=sa[0],
                    in_features=sa[1],
                    out_features=sb[0],
                    members=members,
                    a_keys=(ka,) * len(members),
                    b_keys=(kb,) * len(members),
                    b_scale=b_scale,
                    out_dtype=dtype or default_factor_dtype(da),
                    nbytes_in=len(members) * (_nbytes(sa, da) + _nbytes(sb, db)),
                )
        modules.append(planned or _plan_module(name, list(members), sources, [slot] * len(members), rules, dtype,
                                               layout))  # fmt: skip
    return modules


@lru_cache(maxsize=1 << 16)
def _saved_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The output keys of a module's A and B (strings only: remembered, as in keys.py)."""
    return FactorKey(module, "A", embedding).saved_key(), FactorKey(module, "B", embedding).saved_key()


def _constant_scales(rules) -> tuple[set[int], tuple[float, ...] | None] | None:
    """When no config has per-module patterns: ({r of each adapter}, each adapter's
    scaling / the output's), the same for every module."""
    if rules is None or rules[1].constant is None or any(rule.constant is None for rule in rules[0]):
        return None
    s_out = rules[1].constant[2]
    return _checked_scales({rule.constant[0] for rule in rules[0]}, [rule.constant[2] / s_out for rule in rules[0]])


def _checked_scales(ranks: set[int], scales: list[float]) -> tuple[set[int], tuple[float, ...] | None]:
    """(ranks, scales), scales None when one is unusable (_plan_module's error)."""
    usable = all(math.isfinite(scale) and scale >= sys.float_info.min for scale in scales)
    return ranks, tuple(scales) if usable else None


def _uniform_scales(rules, constant, own: str, out_module: str, rank: int, T: int) -> tuple[float, ...] | None:
    """b_scale of a module of uniform adapters, or None where _plan_module raises."""
    if rules is None:
        return (1.0,) * T
    if constant is None:
        per_adapter = [rule(own) for rule in rules[0]]
        s_out = rules[1](out_module)[2]
        ranks, scales = _checked_scales({r for r, _, _ in per_adapter}, [s_t / s_out for _, _, s_t in per_adapter])
    else:
        ranks, scales = constant
    return scales if ranks == {rank} else None


def _plan_module(name, members, sources, slots, rules, dtype, layout) -> ModulePlan:
    ref = None  # (label, A shape, B shape) of the first member
    first_spelling = slots[0]["A"][1]
    out_module = output_name(name, first_spelling.module, layout)  # one layout for every output key
    a_keys, b_keys, scales = [], [], []
    nbytes = 0
    for t, slot in zip(members, slots):
        src = sources[t]
        (ka, pa), (kb, _) = slot["A"], slot["B"]
        sa, sb = src.shape(ka), src.shape(kb)
        for key, shape in ((ka, sa), (kb, sb)):
            if len(shape) != 2:
                raise AdapterError(f"expected a 2-D LoRA factor, got shape {list(shape)}", src.label, key)
            _check_dtype(src, key)
        if sa[0] != sb[1]:
            raise AdapterError(
                f"rank mismatch inside the adapter: lora_A is {list(sa)} but lora_B is {list(sb)}", src.label, kb
            )
        if 0 in sa or 0 in sb:
            raise AdapterError(f"empty LoRA factor (shapes {list(sa)} and {list(sb)})", src.label, ka)
        if ref is None:
            ref = (src.label, sa, sb)
        elif (sa, sb) != ref[1:]:
            what = "rank" if sa[0] != ref[1][0] else "base layer shape"
            raise AdapterError(
                f"{what} differs: lora_A {list(sa)}, lora_B {list(sb)} here but lora_A {list(ref[1])}, "
                f"lora_B {list(ref[2])} in adapter {ref[0]} (adapters for different base models or ranks "
                "cannot be merged)",
                src.label,
                ka,
            )
        scale = 1.0
        if rules is not None:
            own = pa.module  # this adapter's spelling: its rank/alpha patterns match it
            r_t, _, s_t = rules[0][t](own)
            if r_t != sa[0]:
                raise AdapterError(f"config says r={r_t} for module {own!r} but lora_A has {sa[0]} rows", src.label, ka)
            s_out = rules[1](out_module)[2]  # the output config's patterns match output names
            scale = s_t / s_out
            if not (math.isfinite(scale) and scale >= sys.float_info.min):  # folded into B: must be usable
                raise AdapterError(
                    f"LoRA scaling {s_t!r} (lora_alpha / r) differs from the output's {s_out!r} by a factor float64 "
                    "cannot represent; these adapters' lora_alpha values are too far apart to merge",
                    src.label,
                    ka,
                )
        nbytes += _nbytes(sa, src.dtype(ka)) + _nbytes(sb, src.dtype(kb))
        a_keys.append(ka)
        b_keys.append(kb)
        scales.append(scale)
    first = sources[members[0]]
    return ModulePlan(
        name=out_module,
        a_key=FactorKey(out_module, "A", first_spelling.embedding).saved_key(),
        b_key=FactorKey(out_module, "B", first_spelling.embedding).saved_key(),
        rank=ref[1][0],
        in_features=ref[1][1],
        out_features=ref[2][0],
        members=tuple(members),
        a_keys=tuple(a_keys),
        b_keys=tuple(b_keys),
        b_scale=tuple(scales),
        out_dtype=dtype or default_factor_dtype(first.dtype(a_keys[0])),
        nbytes_in=nbytes,
    )


def _mean_file(sources, carriers, canonical: str, layout: str | None) -> str | None:
    """The file an averaged tensor is written to: that of its first carrier spelled in the
    output layout; when only adapters of other layouts carry it, where the output layout
    keeps it (original LLaVA: the projector in non_lora_trainables.bin, which its loader
    reads; Hugging Face: the weights file, which PeftModel.from_pretrained loads)."""
    for t, key in carriers:
        if layout is None or layout_of(key) in (None, layout):
            return sources[t].file_of.get(key)
    if layout == ORIGINAL_LAYOUT and canonical.removeprefix(PEFT_PREFIX).startswith(ORIGINAL_PROJECTOR):
        return NON_LORA_NAME
    return None


def _plan_means(sources, others_per_source, dtype, layout) -> list[MeanPlan]:
    members: dict[str, list[tuple[int, str]]] = {}
    for t, others in enumerate(others_per_source):
        for canonical, key in others.items():
            members.setdefault(canonical, []).append((t, key))
    means = []
    for canonical, carriers in members.items():
        t0, k0 = carriers[0]
        first = sources[t0]
        for t, key in carriers:
            _check_dtype(sources[t], key)
            if sources[t].shape(key) != first.shape(k0):
                raise AdapterError(
                    f"shape {list(sources[t].shape(key))} differs from {list(first.shape(k0))} in adapter "
                    f"{first.label}; non-LoRA tensors are averaged and must match",
                    sources[t].label,
                    key,
                )
        means.append(
            MeanPlan(
                key=output_name(canonical, k0, layout),
                shape=first.shape(k0),
                members=tuple(t for t, _ in carriers),
                keys=tuple(k for _, k in carriers),
                out_dtype=dtype or first.dtype(k0),  # as the official code: the inputs' dtype
                file=_mean_file(sources, carriers, canonical, layout),
            )
        )
    return means
