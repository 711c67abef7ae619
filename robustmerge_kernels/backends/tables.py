"""The plan tables every compiled backend consumes (CPU C++, CUDA, Triton), and what they
share after a kernel call: status arrays to exceptions, thresholds and scales to details.

One row per (module, adapter) item and one per module, as int64 tensors, plus the
per-item B-scales. This module is the schema: ``ITEM_COLUMNS`` / ``MODULE_COLUMNS`` name the
columns in order. The C++ side declares the same list once
(csrc/robustmerge/plan_tables.h, an X-macro that yields its enums and the names the
bindings export); each compiled module's names are checked against these at load
(base.load_extension), and the Triton kernels take their column indices from here.
Building the tables validates the tensors against the plan, allocates the outputs on the
target device and keeps every tensor whose address is in a table alive for as long as the
tables are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..params import RobustMergeParams
from ..reference import prune_count
from .base import ModuleInputs, NonFiniteInput, OutputOverflow

# Per (module, adapter) item: input addresses, their dtype codes, the prune counts k.
ITEM_COLUMNS = ("a", "b", "a_dtype", "b_dtype", "k_a", "k_b")
# Per module: shapes, its items [first, first + members), output addresses and dtype code,
# and the position of the clamp quantile among the sorted A-row scales.
MODULE_COLUMNS = ("rank", "in_features", "out_features", "first", "members", "out_a", "out_b", "out_dtype", "clamp_index")
ITEM = {name: i for i, name in enumerate(ITEM_COLUMNS)}  # column index by name
MODULE = {name: i for i, name in enumerate(MODULE_COLUMNS)}
KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # input types of the kernels
OUT_DTYPES = {**KERNEL_DTYPES, torch.float64: 3}


@dataclass
class PlanTables:
    items: torch.Tensor  # int64 [W, len(ITEM_COLUMNS)]
    modules: torch.Tensor  # int64 [M, len(MODULE_COLUMNS)]
    b_scale: torch.Tensor  # float64 [W]
    outputs: list[tuple[torch.Tensor, torch.Tensor]]  # per module (A*, B*), allocated on `device`
    members: list[int]  # per module, its number of items
    keep_alive: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return self.items.shape[0]

    def locate(self, item: int) -> tuple[int, int]:
        """Item index -> (module position in the group, member position)."""
        for m, count in enumerate(self.members):
            if item < count:
                return m, item
            item -= count
        raise IndexError(item)


def kernel_supported(g: ModuleInputs) -> bool:
    """Whether a module's inputs are all kernel input types (float64 ones are not)."""
    return all(x.dtype in KERNEL_DTYPES for x in (*g.a, *g.b))


def _check_input(x: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    if x.device != device:
        raise ValueError(f"expected a tensor on {device} for {what}, got {x.device}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"kernels cannot read {x.dtype} for {what}")
    return x.contiguous()


def build_tables(group: list[ModuleInputs], params: RobustMergeParams, device: torch.device) -> PlanTables:
    """Tables for ``group`` (all kernel-supported), with outputs allocated on ``device``.

    The tables themselves stay on the CPU; a GPU backend copies them over.
    """
    items, b_scale, modules, keep, outputs = [], [], [], [], []
    for g in group:
        p = g.plan
        if p.out_dtype not in OUT_DTYPES:
            raise ValueError(f"kernels cannot write {p.out_dtype} for {p.name}")
        out_a = torch.empty((p.rank, p.in_features), dtype=p.out_dtype, device=device)
        out_b = torch.empty((p.out_features, p.rank), dtype=p.out_dtype, device=device)
        outputs.append((out_a, out_b))
        clamp_index = min(int(p.rank * params.clamp_quantile), p.rank - 1)
        modules.append([
            p.rank, p.in_features, p.out_features, len(items), len(p.members),
            out_a.data_ptr(), out_b.data_ptr(), OUT_DTYPES[p.out_dtype], clamp_index,
        ])  # fmt: skip
        for j, (a, b) in enumerate(zip(g.a, g.b)):
            a = _check_input(a, device, f"{p.name} lora_A of member {j}")
            b = _check_input(b, device, f"{p.name} lora_B of member {j}")
            if a.shape != (p.rank, p.in_features) or b.shape != (p.out_features, p.rank):
                raise ValueError(f"{p.name} member {j}: shapes {tuple(a.shape)}, {tuple(b.shape)} differ from the plan")
            keep += (a, b)  # contiguous copies must outlive the kernel call
            items.append([
                a.data_ptr(), b.data_ptr(), KERNEL_DTYPES[a.dtype], KERNEL_DTYPES[b.dtype],
                prune_count(a.numel(), params.density), prune_count(b.numel(), params.density),
            ])  # fmt: skip
            b_scale.append(p.b_scale[j])
    return PlanTables(
        items=torch.tensor(items, dtype=torch.int64),
        modules=torch.tensor(modules, dtype=torch.int64),
        b_scale=torch.tensor(b_scale, dtype=torch.float64),
        outputs=outputs,
        members=[len(g.plan.members) for g in group],
        keep_alive=keep,
    )


def key_to_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """A magnitude key (the bits of |x|) as a value of ``dtype``."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    return torch.tensor([key], dtype=torch.int64).to(view).view(dtype)[0]


def raise_kernel_status(group, tables, ok, status: torch.Tensor, module_status: torch.Tensor) -> None:
    """Turn a kernel's status arrays into NonFiniteInput / OutputOverflow."""
    if not ok:
        bad = int(torch.nonzero(status)[0])
        factor = "A" if int(status[bad]) & 1 else "B"
        m, member = tables.locate(bad)
        raise NonFiniteInput(group[m].plan, member, factor)
    for g, flags in zip(group, module_status.tolist()):
        if flags:
            raise OutputOverflow(g.plan, "A" if flags & 1 else "B")


def unpack_details(group, tau: torch.Tensor, scales: torch.Tensor):
    """Kernel thresholds (magnitude keys, [W, 2]) and scales (concatenated) per item."""
    keys = (tau.to(torch.int64) & 0xFFFFFFFF).tolist()
    tau_a, tau_b, out_scales = [], [], []
    item, offset = 0, 0
    for g in group:
        for j in range(len(g.plan.members)):
            tau_a.append(key_to_value(keys[item][0], g.a[j].dtype))
            tau_b.append(key_to_value(keys[item][1], g.b[j].dtype))
            out_scales.append(scales[offset : offset + g.plan.rank].clone())
            offset += g.plan.rank
            item += 1
    return tau_a, tau_b, out_scales
