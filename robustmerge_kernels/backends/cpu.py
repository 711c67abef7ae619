"""The CPU C++ backend: one kernel call per group of modules (robustmerge_kernels._cpu).

This layer owns all memory and validation: it checks the tensors, makes them contiguous,
allocates the outputs, and passes the plan as two int64 tables (see
csrc/robustmerge/robustmerge_cpu.h for the columns) plus raw addresses. The kernel finds
thresholds by radix selection, row-sum scales and the fused normalised sum, threaded
over (adapter, module) work items; results do not depend on the thread count.

float64 inputs are not a kernel type: such modules go to the reference implementation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..params import RobustMergeParams
from ..reference import prune_count, robustmerge_module
from . import BackendUnavailable, ModuleInputs, NonFiniteInput, OutputOverflow

ENV_THREADS = "ROBUSTMERGE_NUM_THREADS"
KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OUT_DTYPES = {**KERNEL_DTYPES, torch.float64: 3}
_MAG_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Threads the CPU kernels use (None: $ROBUSTMERGE_NUM_THREADS, else torch's count)."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    _threads = n


def get_num_threads() -> int:
    if _threads is not None:
        return _threads
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"${ENV_THREADS} must be a positive integer, got {env!r}")
        return int(env)
    return max(1, torch.get_num_threads())


def _load_extension():
    try:
        from .. import _cpu
    except ImportError as exc:
        raise BackendUnavailable(f"the C++ extension is not built ({exc}); run `pip install -e .`") from exc
    return _cpu


@dataclass
class CpuDetails:
    """Per (module, adapter) item, in group order: thresholds as values of the input dtype
    and the clamped A-row scales. For tests and for comparing backends."""

    outputs: list[tuple[torch.Tensor, torch.Tensor]]
    tau_a: list[torch.Tensor]
    tau_b: list[torch.Tensor]
    scales: list[torch.Tensor]


def _check_input(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"cpu backend got a {x.device} tensor for {what}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"cpu backend cannot read {x.dtype} for {what}")
    return x.contiguous()


def _key_to_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    view = _MAG_VIEW[dtype]
    return torch.tensor([key], dtype=torch.int64).to(view).view(dtype)[0]


class CpuBackend:
    name = "cpu"
    checks_finite = True  # the kernel sees inf/NaN in its histogram pass and overflow as it stores

    def __init__(self):
        self._ext = _load_extension()

    def robustmerge(self, group: list[ModuleInputs], params: RobustMergeParams) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.run(group, params).outputs

    def run(self, group: list[ModuleInputs], params: RobustMergeParams, details: bool = False) -> CpuDetails:
        """Merge a group; with ``details`` also return the kernel's thresholds and scales."""
        result = CpuDetails([None] * len(group), [], [], [])
        kernel = []
        for pos, g in enumerate(group):
            if all(x.dtype in KERNEL_DTYPES for x in (*g.a, *g.b)):
                kernel.append(pos)
            else:  # float64 input: the exact reference path
                res = robustmerge_module(g.a, g.b, params, g.plan.b_scale, g.plan.out_dtype)
                result.outputs[pos] = (res.a, res.b)
        if kernel:
            self._run_kernel([group[pos] for pos in kernel], kernel, params, details, result)
        return result

    def _run_kernel(self, group, positions, params, details, result) -> None:
        items, b_scale, modules, inputs = [], [], [], []
        for pos, g in zip(positions, group):
            p = g.plan
            if p.out_dtype not in OUT_DTYPES:
                raise ValueError(f"cpu backend cannot write {p.out_dtype} for {p.name}")
            out_a = torch.empty((p.rank, p.in_features), dtype=p.out_dtype)
            out_b = torch.empty((p.out_features, p.rank), dtype=p.out_dtype)
            result.outputs[pos] = (out_a, out_b)
            clamp_index = min(int(p.rank * params.clamp_quantile), p.rank - 1)
            modules.append([
                p.rank, p.in_features, p.out_features, len(items), len(p.members),
                out_a.data_ptr(), out_b.data_ptr(), OUT_DTYPES[p.out_dtype], clamp_index,
            ])  # fmt: skip
            for j, (a, b) in enumerate(zip(g.a, g.b)):
                a = _check_input(a, f"{p.name} lora_A of member {j}")
                b = _check_input(b, f"{p.name} lora_B of member {j}")
                if a.shape != (p.rank, p.in_features) or b.shape != (p.out_features, p.rank):
                    raise ValueError(f"cpu backend: {p.name} member {j} shapes {tuple(a.shape)}, {tuple(b.shape)} != plan")
                inputs += (a, b)  # keeps contiguous copies alive during the call
                items.append([
                    a.data_ptr(), b.data_ptr(), KERNEL_DTYPES[a.dtype], KERNEL_DTYPES[b.dtype],
                    prune_count(a.numel(), params.density), prune_count(b.numel(), params.density),
                ])  # fmt: skip
                b_scale.append(p.b_scale[j])
        items_t = torch.tensor(items, dtype=torch.int64)
        modules_t = torch.tensor(modules, dtype=torch.int64)
        b_scale_t = torch.tensor(b_scale, dtype=torch.float64)
        status = torch.zeros(len(items), dtype=torch.int32)
        module_status = torch.zeros(len(modules), dtype=torch.int32)
        tau = torch.zeros((len(items), 2), dtype=torch.int32)
        scales = torch.zeros(sum(g.plan.rank * len(g.plan.members) for g in group), dtype=torch.float64)
        ok = self._ext.robustmerge(
            items_t.data_ptr(), len(items), b_scale_t.data_ptr(), modules_t.data_ptr(), len(modules),
            float(params.lam), get_num_threads(), status.data_ptr(), module_status.data_ptr(),
            tau.data_ptr() if details else 0, scales.data_ptr() if details else 0,
        )  # fmt: skip
        if not ok:
            bad = int(torch.nonzero(status)[0])
            factor = "A" if int(status[bad]) & 1 else "B"
            for g in group:  # item index -> (module, member)
                if bad < len(g.plan.members):
                    raise NonFiniteInput(g.plan, bad, factor)
                bad -= len(g.plan.members)
        for g, flags in zip(group, module_status.tolist()):
            if flags:
                raise OutputOverflow(g.plan, "A" if flags & 1 else "B")
        if details:
            keys = (tau.to(torch.int64) & 0xFFFFFFFF).tolist()
            item, offset = 0, 0
            for g in group:
                for j in range(len(g.plan.members)):
                    result.tau_a.append(_key_to_value(keys[item][0], g.a[j].dtype))
                    result.tau_b.append(_key_to_value(keys[item][1], g.b[j].dtype))
                    result.scales.append(scales[offset : offset + g.plan.rank].clone())
                    offset += g.plan.rank
                    item += 1
