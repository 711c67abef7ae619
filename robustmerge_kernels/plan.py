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
    module_members: dict[str, list[int]] = {}
    if all(keys is per_source[0] for keys in per_source):  # one key list: every adapter carries every module
        module_members = dict.fromkeys(per_source[0].factors, list(range(len(sources))))  # one list, read only
    else:
        for t, keys in enumerate(per_source):
            for module in keys.factors:
                module_members.setdefault(module, []).append(t)
    classes = _classes(sources, per_source)
    shortcut = _Shortcut(sources, per_source, classes, rules, dtype, layout) if classes is not None else None
    modules = [
        (shortcut.plan(name, members) if shortcut is not None else None)
        or _plan_module(name, members, sources, [per_source[t].factors[name] for t in members], rules, dtype, layout)
        for name, members in module_members.items()
    ]
    means = _plan_means(sources, [keys.others for keys in per_source], dtype, layout)
    return MergePlan(sources, modules, means, out_config, layout)


def output_layout(per_source: list[_Keys]) -> str | None:
    """The first adapter's LLaVA layout (the first that has a layout name, in input order):
    every output key is spelled in it, so a module that only a later adapter of another
    layout carries does not land under a name the loader of the output does not know."""
    return next((keys.layout for keys in per_source if keys.layout is not None), None)


MAX_CLASSES = 8  # more kinds of adapters than this: plan every (module, adapter) pair


def _classes(sources: list[AdapterSource], per_source: list[_Keys]) -> list[int] | None:
    """Per adapter, its class: adapters of one class have the same key list, shapes and
    dtypes (T fine-tunes of one model are one class), so every check of _plan_module gives
    the same answer for each of them. None when there are more than MAX_CLASSES."""
    reps: list[tuple[_Keys, list, list]] = []
    out = []
    for s, keys in zip(sources, per_source):
        shapes, dtypes = s.all_shapes(), s.all_dtypes()
        found = next((c for c, rep in enumerate(reps) if rep[0] is keys and rep[1:] == (shapes, dtypes)), None)
        if found is None:  # one key list is one cached _Keys: `is` compares key lists
            if len(reps) == MAX_CLASSES:
                return None
            found = len(reps)
            reps.append((keys, shapes, dtypes))
        out.append(found)
    return out


class _Shortcut:
    """_plan_module for adapters in few classes (_classes): each module's factors are checked
    once per class instead of once per adapter. A module for which any check fails is left
    to _plan_module (``plan`` returns None), which raises the error it always raised."""

    def __init__(self, sources, per_source, classes, rules, dtype, layout):
        self.sources, self.per_source, self.classes = sources, per_source, classes
        self.rules, self.dtype, self.layout = rules, dtype, layout
        self.first = [classes.index(c) for c in range(max(classes) + 1)]  # an adapter of each class
        # Without per-module patterns, each adapter's r and scaling / output scaling are the
        # same for every module: (r, ratio, ratio usable) per adapter.
        self.constant = self.every = None
        if rules is not None and rules[1].constant is not None and all(r.constant is not None for r in rules[0]):
            s_out = rules[1].constant[2]
            self.constant = [(r.constant[0], r.constant[2] / s_out) for r in rules[0]]
            self.constant = [(r, scale, _usable_scale(scale)) for r, scale in self.constant]
            # the same for a module that every adapter carries: ({r}, b_scale, all usable)
            self.every = ({r for r, _, _ in self.constant}, tuple(x for _, x, _ in self.constant),
                          all(ok for _, _, ok in self.constant))  # fmt: skip

    def plan(self, name: str, members: list[int]) -> ModulePlan | None:
        heads = {}  # class -> (A key, B key, parsed A key, input bytes of one adapter, A dtype)
        shapes = None
        for c in (0,) if len(self.first) == 1 else dict.fromkeys(map(self.classes.__getitem__, members)):
            src = self.sources[self.first[c]]
            (ka, pa), (kb, _) = (slot := self.per_source[self.first[c]].factors[name])["A"], slot["B"]
            sa, sb, da, db = src.shape(ka), src.shape(kb), src.dtype(ka), src.dtype(kb)
            shapes = shapes or (sa, sb)
            if not (
                len(sa) == len(sb) == 2
                and da in MERGEABLE_DTYPES
                and db in MERGEABLE_DTYPES
                and sa[0] == sb[1]
                and 0 not in sa
                and 0 not in sb
                and (sa, sb) == shapes
            ):
                return None
            heads[c] = (ka, kb, pa, _nbytes(sa, da) + _nbytes(sb, db), da)
        (sa, sb), n = shapes, len(members)
        if len(heads) == 1:  # one class: the members' columns are one value repeated
            (ka, kb, pa, nbytes, da) = next(iter(heads.values()))
            a_keys, b_keys, own, nbytes = (ka,) * n, (kb,) * n, [pa.module] * n, n * nbytes
        else:
            per = [heads[c] for c in map(self.classes.__getitem__, members)]
            a_keys, b_keys, own = tuple(h[0] for h in per), tuple(h[1] for h in per), [h[2].module for h in per]
            pa, nbytes, da = per[0][2], sum(h[3] for h in per), per[0][4]
        out_module = output_name(name, pa.module, self.layout)  # the first member's spelling, in the output layout
        b_scale = self._scales(members, own, out_module, sa[0])
        if b_scale is None:
            return None
        a_key, b_key = _saved_keys(out_module, pa.embedding)
        return ModulePlan(
            name=out_module,
            a_key=a_key,
            b_key=b_key,
            rank=sa[0],
            in_features=sa[1],
            out_features=sb[0],
            members=tuple(members),
            a_keys=a_keys,
            b_keys=b_keys,
            b_scale=b_scale,
            out_dtype=self.dtype or default_factor_dtype(da),
            nbytes_in=nbytes,
        )

    def _scales(self, members, own, out_module, rank) -> tuple[float, ...] | None:
        """Each member's b_scale (own: its spelling of the module), or None where
        _plan_module raises (config r differs from the factor's, unusable ratio)."""
        if self.rules is None:
            return (1.0,) * len(members)
        if self.every is not None and len(members) == len(self.constant):  # every adapter carries it
            ranks, scales, usable = self.every
            return scales if usable and ranks == {rank} else None
        if self.constant is not None:
            per = [self.constant[t] for t in members]
        else:
            s_out = self.rules[1](out_module)[2]  # the output config's patterns match output names
            per = []
            for t, module in zip(members, own):
                r_t, _, s_t = self.rules[0][t](module)
                per.append((r_t, s_t / s_out, _usable_scale(s_t / s_out)))
        if not all(r == rank and usable for r, _, usable in per):
            return None
        return tuple(scale for _, scale, _ in per)


def _usable_scale(scale: float) -> bool:
    return math.isfinite(scale) and scale >= sys.float_info.min  # folded into B: must be usable


@lru_cache(maxsize=1 << 16)
def _saved_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The output keys of a module's A and B (strings only: remembered, as in keys.py)."""
    return FactorKey(module, "A", embedding).saved_key(), FactorKey(module, "B", embedding).saved_key()


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
            if not _usable_scale(scale):
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
