"""Baseline merge methods (docs/ALGORITHM.md §4) behind the same ``merge()`` call as RobustMerge.

One line each; ``s_t`` is adapter t's own LoRA scaling (alpha/r or alpha/sqrt(r), per
module), ``w_t`` its weight (``weights``, default 1.0 each), ``a_t = sgn(w_t s_t) sqrt|w_t s_t|``,
``b_t = sqrt|w_t s_t|`` (PEFT's split of the weight over the two factors). Every method
writes an adapter with ``lora_alpha = r`` (scaling 1): the scaling is inside the factors.

* linear / task_arithmetic:  A* = sum_t a_t A_t,  B* = sum_t b_t B_t   (PEFT "linear"; B* A* has
  cross terms B_i A_j, so it is not sum_t w_t dW_t -- that is ``cat``)
* ties:            TIES (top-k by magnitude, elected sign, disjoint mean) on {a_t A_t}, {b_t B_t}
* magnitude_prune: sum_t of top-k(A_t) weighted by a_t, same for B
* dare_linear:     sum_t a_t keep_t A_t / density (hashed Bernoulli keep), same for B
* dare_ties:       TIES' election and disjoint mean on the DARE-dropped, rescaled factors
* pcb:             PCB-merging's intra/inter balancing on {a_t A_t}, and on {b_t B_t}
* cat:             A* = [w_t s_t A_t]_t stacked,  B* = [B_t]_t   (rank sum r_t; B* A* = sum_t w_t dW_t exactly)
* svd:             rank-``svd_rank`` truncated SVD of sum_t w_t dW_t, in the low-rank space (QR + Tr x Tr SVD)
* ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the combiner applied to the
  dense dW_t = s_t B_t A_t (m x n), then the truncated SVD (PEFT's *_svd)

Numerics: inputs of any float dtype are computed in float32 (float64 stays float64);
masks are taken on the stored values. See :mod:`.combine`, :mod:`.lowrank`, :mod:`.pcb`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapter_io.keys import PEFT_PREFIX, canonical_name
from ..adapter_io.scaling import ScalingRule
from ..errors import AdapterError
from ..finite import check_output
from ..plan import MergePlan, ModulePlan
from ..reference import compute_dtype
from . import combine, dare, lowrank, pcb, select
from .combine import disjoint_merge, task_arithmetic
from .lowrank import cat, lowrank_svd, truncate
from .pcb import pcb_merge

__all__ = [
    "METHODS", "PEFT_METHODS", "MethodOptions", "merge_baseline", "merge_module",
    "combine", "dare", "lowrank", "pcb", "select", "task_arithmetic", "disjoint_merge", "cat", "lowrank_svd",
    "truncate", "pcb_merge",
]  # fmt: skip

PEFT_METHODS = (
    "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
    "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
)  # fmt: skip
FACTOR_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "pcb")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("task_arithmetic", *PEFT_METHODS, "pcb")

_USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_USES_SIGN = ("ties", "dare_ties")


@dataclass(frozen=True)
class MethodOptions:
    """Options of the baseline methods, named as in PEFT's ``add_weighted_adapter``."""

    weights: tuple[float, ...] | None = None  # per adapter (default 1.0 each)
    density: float = 0.2  # fraction kept (ties, dare_*, magnitude_prune and their _svd)
    majority_sign_method: str = "total"  # ties / dare_ties: "total" or "frequency"
    svd_rank: int | None = None  # svd family: output rank (default: the largest input rank)
    svd_clamp: float | None = None  # svd family: clamp factors at this quantile
    seed: int = 0  # DARE's drop hash
    pcb_ratio: float = 0.1  # pcb: fraction of entries whose balancing weight survives

    def hyperparameters(self, method: str) -> dict[str, Any]:
        base = method.removesuffix("_svd")
        out: dict[str, Any] = {"weights": list(self.weights) if self.weights is not None else None}
        if base in _USES_DENSITY:
            out["density"] = self.density
        if base in _USES_SIGN:
            out["majority_sign_method"] = self.majority_sign_method
        if base.startswith("dare"):
            out["seed"] = self.seed
        if method in SVD_METHODS:
            out["svd_rank"] = self.svd_rank
            out["svd_clamp"] = self.svd_clamp
        if method == "pcb":
            out["pcb_ratio"] = self.pcb_ratio
        return out


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_options(method: str, opts: MethodOptions, n_adapters: int) -> None:
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}")
    if opts.weights is not None:
        if len(opts.weights) != n_adapters:
            raise AdapterError(f"weights has {len(opts.weights)} entries for {n_adapters} adapters")
        for w in opts.weights:
            _number("each weight", w)
    base = method.removesuffix("_svd")
    if base in _USES_DENSITY:
        d = _number("density", opts.density)
        if not 0.0 <= d <= 1.0 or (base.startswith("dare") and d == 0.0):
            raise AdapterError(
                f"density must be in {'(0' if base.startswith('dare') else '[0'}, 1] for {method}, got {d!r}"
            )
    if base in _USES_SIGN and opts.majority_sign_method not in ("total", "frequency"):
        raise AdapterError(f"majority_sign_method must be 'total' or 'frequency', got {opts.majority_sign_method!r}")
    if opts.svd_rank is not None and (
        isinstance(opts.svd_rank, bool) or not isinstance(opts.svd_rank, int) or opts.svd_rank < 1
    ):
        raise AdapterError(f"svd_rank must be a positive integer, got {opts.svd_rank!r}")
    if opts.svd_clamp is not None and not 0.0 <= _number("svd_clamp", opts.svd_clamp) <= 1.0:
        raise AdapterError(f"svd_clamp must be a quantile in [0, 1], got {opts.svd_clamp!r}")
    if not isinstance(opts.seed, int) or isinstance(opts.seed, bool):
        raise AdapterError(f"seed must be an integer, got {opts.seed!r}")
    if method == "pcb" and not 0.0 < _number("pcb_ratio", opts.pcb_ratio) <= 1.0:
        raise AdapterError(f"pcb_ratio must be in (0, 1], got {opts.pcb_ratio!r}")


def output_rank(method: str, m: ModulePlan, opts: MethodOptions, max_rank: int) -> int:
    if method == "cat":
        return m.rank * len(m.members)
    if method in SVD_METHODS:
        return opts.svd_rank or max_rank
    return m.rank


def merge_module(
    method: str,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    scaling: Sequence[float],
    weights: Sequence[float],
    opts: MethodOptions,
    rank: int,
    name: str = "module",
    members: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module: ``a[t]`` [r, n], ``b[t]`` [m, r] with LoRA scaling ``scaling[t]`` and weight
    ``weights[t]``. Returns (A*, B*) in the compute dtype, for an output scaling of 1.
    ``name`` and ``members`` (adapter positions) name the tensors for DARE's hash."""
    ct = compute_dtype(*(x.dtype for x in (*a, *b)))
    members = list(members) if members is not None else list(range(len(a)))
    ws = [float(w) * float(s) for w, s in zip(weights, scaling)]
    if method == "cat":
        return cat(a, b, ws, ct)
    if method == "svd":
        u, s, vh = lowrank_svd(a, b, ws)
        return truncate(u, s, vh, rank, ct, opts.svd_clamp)
    base = method.removesuffix("_svd")
    if method in SVD_METHODS:  # dense combiners: PEFT's *_svd on dW_t = s_t B_t A_t
        deltas = torch.stack([(y.to(ct) @ x.to(ct)) * s for x, y, s in zip(a, b, scaling)])
        w = torch.tensor(list(weights), dtype=torch.float32)
        names = [f"{name}.delta:{t}" for t in members]
        merged = combine.combine(base, deltas, w, opts.density, opts.majority_sign_method, opts.seed, names)
        del deltas
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        return truncate(u, s, vh, rank, ct, opts.svd_clamp)
    # factor-space methods: PEFT's sqrt split of w_t * s_t over A (with the sign) and B
    wa = torch.tensor([math.copysign(math.sqrt(abs(v)), v) if v != 0 else 0.0 for v in ws], dtype=torch.float32)
    wb = torch.tensor([math.sqrt(abs(v)) for v in ws], dtype=torch.float32)
    if base in ("linear", "task_arithmetic"):  # memory-bound: one read of each input, no stacked copy
        return combine.weighted_sum(a, wa, ct), combine.weighted_sum(b, wb, ct)
    out = []
    for factor, xs, w in (("A", a, wa), ("B", b, wb)):
        stack = torch.stack([x.to(ct) for x in xs])
        if method == "pcb":
            out.append(pcb_merge(stack * w.to(ct).view(-1, 1, 1), opts.pcb_ratio))
        else:
            names = [f"{name}.lora_{factor}:{t}" for t in members]
            out.append(
                combine.combine(base, stack, w, opts.density, opts.majority_sign_method, opts.seed, names, raw=xs)
            )
    return out[0], out[1]


def output_config(plan: MergePlan, ranks: dict[str, int]) -> dict[str, Any] | None:
    """The written config: lora_alpha = r (scaling 1, no rsLoRA), per-module rank patterns
    where a module's output rank differs from the most common one."""
    if plan.out_config is None:
        return None
    config = dict(plan.out_config)
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(config["r"])
    patterns = {}
    for module, rank in ranks.items():
        if rank != r:
            patterns[re.escape(module.removeprefix(PEFT_PREFIX))] = rank
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=patterns, alpha_pattern=dict(patterns))
    return config


def merge_baseline(
    plan: MergePlan,
    method: str,
    opts: MethodOptions,
    load: Callable[[int, str], torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Merge every module of ``plan`` with a baseline ``method``; ``load(t, key)`` reads adapter
    t's tensor (finite-checked, on the merge device). Returns (state dict, output config)."""
    check_options(method, opts, len(plan.sources))
    weights = opts.weights or (1.0,) * len(plan.sources)
    out_rule = ScalingRule(plan.out_config) if plan.out_config is not None else None
    max_rank = max((m.rank for m in plan.modules), default=1)
    if method in SVD_METHODS and opts.svd_rank is not None:
        # A module's merged delta has rank at most min(m, n): a larger svd_rank is only zero
        # padding (2 GB of it for svd_rank=2000000 on two tiny adapters; PEFT fails there).
        def supported(m):
            return min(m.in_features, m.out_features)

        limit = max((supported(m) for m in plan.modules), default=0)
        if opts.svd_rank > limit:
            raise AdapterError(f"svd_rank {opts.svd_rank} exceeds the largest rank these inputs support ({limit}: "
                               "a module's merged delta has rank at most min(in_features, out_features))")  # fmt: skip
    merged: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for m in plan.modules:
        s_out = out_rule(m.name)[2] if out_rule is not None else 1.0
        scaling = [bs * s_out for bs in m.b_scale]
        a = [load(t, k) for t, k in zip(m.members, m.a_keys)]
        b = [load(t, k) for t, k in zip(m.members, m.b_keys)]
        rank = output_rank(method, m, opts, max_rank)
        A, B = merge_module(
            method, a, b, scaling, [weights[t] for t in m.members], opts, rank, canonical_name(m.name), m.members
        )
        for key, x in ((m.a_key, A), (m.b_key, B)):
            merged[key] = check_output(key, x.to(m.out_dtype)).contiguous()
        ranks[m.name] = rank
        if progress is not None:
            progress(1)
    return merged, output_config(plan, ranks)
