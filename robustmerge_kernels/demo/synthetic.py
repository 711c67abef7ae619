"""Synthetic LoRA adapters in the shapes of docs/ALGORITHM.md §6, for benchmarks.

The shapes are data (:data:`SHAPES`); :func:`synthetic_adapters` makes ``T`` adapters of
one shape as ``(state_dict, config_dict)`` pairs, which :func:`robustmerge_kernels.merge`
accepts directly. Keys are the ones PEFT saves
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for Llama/LLaVA,
``base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_B.weight`` for CLIP).

Values follow what the RobustMerge paper reports for trained LoRA:

* ``lora_A`` close to uniform at PEFT's Kaiming-uniform init scale (``a = sqrt(5)``):
  ``U(-1/sqrt(n), 1/sqrt(n))`` with ``n`` the module's in-features;
* ``lora_B`` close to Gaussian, ``N(0, b_std)`` (``b_std = 0.01`` by default).

Generation uses a ``torch.Generator`` per adapter, seeded from ``(seed, adapter index)``,
and fills the tensors in the target dtype directly, so it is fast (about 0.2 s per
40 M parameters) and adapter ``t`` is the same whatever ``T`` is. bfloat16/float16
adapters therefore have many exact ties in ``|A|`` and ``|B|``, as real ones do.
These are not trained adapters: use them for speed and memory, never for quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SHAPES",
    "ModelShape",
    "ModuleShape",
    "adapter_nbytes",
    "describe",
    "get_shape",
    "lora_config",
    "module_list",
    "param_count",
    "synthetic_adapter",
    "synthetic_adapters",
]


@dataclass(frozen=True)
class ModuleShape:
    """One LoRA-adapted linear layer per transformer block: ``path`` inside the block."""

    path: str  # e.g. "self_attn.q_proj" or "mlp.fc1"
    in_features: int  # columns of lora_A
    out_features: int  # rows of lora_B

    @property
    def target(self) -> str:
        """The name PEFT's ``target_modules`` uses (the last path component)."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelShape:
    """A benchmark model shape: ``layers`` blocks, each with the LoRA-adapted ``modules``."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    modules: tuple[ModuleShape, ...]
    layer_prefix: str  # module key prefix; "{i}" is the layer index
    spec_params_r16: float  # "params per r16 adapter" as docs/ALGORITHM.md §6 states it, in millions

    @property
    def target_modules(self) -> list[str]:
        return [m.target for m in self.modules]


def _transformer(name: str, layers: int, hidden: int, intermediate: int, spec_m: float, layer_prefix: str,
                 attention: tuple[str, ...], up: tuple[str, ...], down: str) -> ModelShape:  # fmt: skip
    """LoRA on every attention projection (hidden -> hidden), the MLP's ``up`` projections
    (hidden -> intermediate) and its ``down`` projection (intermediate -> hidden)."""
    h, i = hidden, intermediate
    return ModelShape(
        name=name,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        modules=(
            *(ModuleShape(f"self_attn.{p}", h, h) for p in attention),
            *(ModuleShape(f"mlp.{p}", h, i) for p in up),
            ModuleShape(f"mlp.{down}", i, h),
        ),
        layer_prefix=layer_prefix,
        spec_params_r16=spec_m,
    )


def _llama(name: str, layers: int, hidden: int, intermediate: int, spec_m: float) -> ModelShape:
    return _transformer(name, layers, hidden, intermediate, spec_m, "base_model.model.model.layers.{i}",
                        ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj"), "down_proj")  # fmt: skip


def _clip(name: str, layers: int, hidden: int, intermediate: int, spec_m: float) -> ModelShape:
    return _transformer(name, layers, hidden, intermediate, spec_m, "base_model.model.vision_model.encoder.layers.{i}",
                        ("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1",), "fc2")  # fmt: skip


#: docs/ALGORITHM.md §6. ``spec_params_r16`` is the table's figure, kept to check it against.
SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _llama("llava-7b", 32, 4096, 11008, 40.0),
        _llama("llava-13b", 40, 5120, 13824, 62.6),
        # NB: q,k,v,out_proj,fc1,fc2 on 12 layers of 768/3072 at r=16 is 2.65 M parameters;
        # the original table (docs/ALGORITHM.md §6) says 2.4 M. The shape follows the module list, not the total.
        _clip("clip-vit-b32", 12, 768, 3072, 2.4),
    )
}


def get_shape(shape: str | ModelShape) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise KeyError(f"unknown benchmark shape {shape!r}; known: {', '.join(SHAPES)}") from None


def _layer_indices(shape: ModelShape, layers: int | None) -> range:
    if layers is None:
        return range(shape.layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= shape.layers:
        raise ValueError(f"layers must be an int in [1, {shape.layers}] for {shape.name}, got {layers!r}")
    return range(layers)


def module_list(shape: str | ModelShape, layers: int | None = None) -> list[tuple[str, int, int]]:
    """``(module key prefix, in_features, out_features)`` for every adapted module, in order."""
    s = get_shape(shape)
    return [
        (f"{s.layer_prefix.format(i=i)}.{m.path}", m.in_features, m.out_features)
        for i in _layer_indices(s, layers)
        for m in s.modules
    ]


def param_count(shape: str | ModelShape, rank: int = 16, layers: int | None = None) -> int:
    """Elements in one adapter (all lora_A and lora_B) of this shape and rank."""
    return sum(rank * (n + m) for _, n, m in module_list(shape, layers))


def adapter_nbytes(
    shape: str | ModelShape, rank: int = 16, dtype: torch.dtype = torch.float32, layers: int | None = None
) -> int:
    """Bytes of one adapter's lora_A and lora_B tensors."""
    return param_count(shape, rank, layers) * dtype.itemsize


def lora_config(shape: str | ModelShape, rank: int = 16, lora_alpha: float | None = None) -> dict[str, Any]:
    """The adapter_config.json a PEFT LoRA adapter of this shape would carry."""
    s = get_shape(shape)
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank if lora_alpha is None else lora_alpha,
        "target_modules": s.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": f"synthetic/{s.name}",
    }


def _generator(seed: int, index: int) -> torch.Generator:
    # Distinct, reproducible stream per (seed, adapter index); independent of T.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))


def synthetic_adapter(
    shape: str | ModelShape,
    rank: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    index: int = 0,
    layers: int | None = None,
    *,
    b_std: float = 0.01,
    lora_alpha: float | None = None,
    shared_buffer: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One synthetic adapter ``(state_dict, config)``; ``index`` picks the task's stream.

    ``shared_buffer=True`` carves every tensor out of one contiguous buffer (in key order),
    so benchmarks can copy the adapter's bytes in one call; such a state dict cannot be
    saved with ``safetensors.torch.save_file`` (it refuses tensors sharing memory).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    mods = module_list(shape, layers)
    g = _generator(seed, index)
    buf = torch.empty(sum(rank * (n + m) for _, n, m in mods), dtype=dtype) if shared_buffer else None
    state: dict[str, torch.Tensor] = {}
    offset = 0

    def alloc(rows: int, cols: int) -> torch.Tensor:
        nonlocal offset
        if buf is None:
            return torch.empty(rows, cols, dtype=dtype)
        view = buf[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
        return view

    for prefix, n, m in mods:
        bound = 1.0 / n**0.5  # kaiming_uniform_(a=sqrt(5)) on a [r, n] weight
        state[f"{prefix}.lora_A.weight"] = alloc(rank, n).uniform_(-bound, bound, generator=g)
        state[f"{prefix}.lora_B.weight"] = alloc(m, rank).normal_(0.0, b_std, generator=g)
    return state, lora_config(shape, rank, lora_alpha)


def synthetic_adapters(
    shape: str | ModelShape,
    T: int,
    rank: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: int | None = None,
    **kwargs: Any,
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """``T`` synthetic adapters of one shape (see :func:`synthetic_adapter` for ``kwargs``)."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    return [synthetic_adapter(shape, rank, dtype, seed, t, layers, **kwargs) for t in range(T)]


def describe(shapes: Sequence[str] | None = None, rank: int = 16) -> str:
    """A table of the shapes with their parameter counts (what docs/ALGORITHM.md §6 lists)."""
    lines = [f"{'name':<14} {'layers':>6} {'hidden':>6} {'inter':>6} {'modules':>8} {'params':>9} {'SPEC':>6}"]
    for name in shapes or SHAPES:
        s = get_shape(name)
        lines.append(
            f"{s.name:<14} {s.layers:>6} {s.hidden:>6} {s.intermediate:>6} {len(s.modules):>8} "
            f"{param_count(s, rank) / 1e6:>8.2f}M {s.spec_params_r16:>5.1f}M"
        )
    return "\n".join(lines)
