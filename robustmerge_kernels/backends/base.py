"""What every backend is: the Protocol the pipeline calls, the inputs it hands over, the
errors a backend reports, and :class:`KernelBackend`, the shared body of the compiled ones.

A backend implements ``robustmerge(group, params) -> list[(A*, B*)]`` where ``group`` is a
list of :class:`ModuleInputs` (a batch of modules whose tensors are loaded), so compiled
backends can process the whole batch in one fused launch (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from ..params import RobustMergeParams
from ..plan import ModulePlan


@dataclass
class ModuleInputs:
    """One module's loaded inputs: ``a[i]``/``b[i]`` belong to ``plan.members[i]``."""

    plan: ModulePlan
    a: list[torch.Tensor]
    b: list[torch.Tensor]


class Backend(Protocol):
    name: str
    checks_finite: bool  # True: the backend reports inf/NaN inputs (NonFiniteInput) and outputs (OutputOverflow)

    def robustmerge(
        self, group: list[ModuleInputs], params: RobustMergeParams
    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class BackendUnavailable(RuntimeError):
    """Raised by a factory when its backend cannot run here (no compiler, no GPU, ...)."""


class NonFiniteInput(Exception):
    """Raised by a backend whose kernel found inf/NaN (``checks_finite`` backends); the
    pipeline turns it into an AdapterError naming the adapter and tensor."""

    def __init__(self, plan: ModulePlan, member: int, factor: str):
        super().__init__(f"{plan.name}: member {member} lora_{factor} is not finite")
        self.plan, self.member, self.factor = plan, member, factor


class OutputOverflow(Exception):
    """Raised by a ``checks_finite`` backend whose merged ``factor`` ("A"/"B") of ``plan``
    does not fit its output dtype (finite inputs, inf after the merge)."""

    def __init__(self, plan: ModulePlan, factor: str):
        super().__init__(f"{plan.name}: merged lora_{factor} overflows {plan.out_dtype}")
        self.plan, self.factor = plan, factor


def load_extension(name: str, build_hint: str) -> ModuleType:
    """Import the compiled module ``robustmerge_kernels.<name>`` and check that it reads the
    plan tables this Python code writes (a stale build would read wrong columns)."""
    from .tables import ITEM_COLUMNS, MODULE_COLUMNS, OUT_DTYPES

    try:
        ext = importlib.import_module(f"robustmerge_kernels.{name}")
    except ImportError as exc:
        raise BackendUnavailable(f"the {name} extension is not built ({exc}); {build_hint}") from exc
    dtypes = {str(dtype).removeprefix("torch."): code for dtype, code in OUT_DTYPES.items()}
    if (tuple(ext.ITEM_COLUMNS), tuple(ext.MODULE_COLUMNS), dict(ext.DTYPES)) != (ITEM_COLUMNS, MODULE_COLUMNS, dtypes):
        raise BackendUnavailable(
            f"the {name} extension is stale (plan table columns or dtype codes differ from backends/tables.py); "
            "rebuild with `pip install -e .`"
        )
    return ext


@dataclass
class KernelDetails:
    """Per (module, adapter) item, in group order: thresholds as values of the input dtype
    and the clamped A-row scales. For tests and for comparing backends."""

    outputs: list[tuple[torch.Tensor, torch.Tensor]]
    tau_a: list[torch.Tensor]
    tau_b: list[torch.Tensor]
    scales: list[torch.Tensor]


class KernelBackend:
    """What the compiled backends share: kernel-supported modules go to ``_run_kernel``
    (one call for the whole group), float64 ones to the exact reference."""

    name = "kernel"
    checks_finite = True  # kernels report inf/NaN inputs and overflowing outputs

    def robustmerge(
        self, group: list[ModuleInputs], params: RobustMergeParams
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.run(group, params).outputs

    def run(self, group: list[ModuleInputs], params: RobustMergeParams, details: bool = False) -> KernelDetails:
        """Merge a group; with ``details`` also return the kernel's thresholds and scales."""
        from ..reference import robustmerge_module
        from .tables import KernelDtypeError, kernel_supported

        result = KernelDetails([None] * len(group), [], [], [])
        try:  # the usual case, every input of a kernel type: the tables check that, in C
            outputs, kernel_details = self._run_kernel(group, params, details)
        except KernelDtypeError:  # raised before any kernel runs: split the group
            pass
        else:
            result.outputs = list(outputs)
            if details:
                result.tau_a, result.tau_b, result.scales = kernel_details
            return result
        kernel = []
        for pos, g in enumerate(group):
            if kernel_supported(g):
                kernel.append(pos)
            else:  # float64 input: the exact reference path
                res = robustmerge_module(g.a, g.b, params, g.plan.b_scale, g.plan.out_dtype)
                result.outputs[pos] = (res.a, res.b)
        if kernel:
            outputs, kernel_details = self._run_kernel([group[pos] for pos in kernel], params, details)
            for pos, out in zip(kernel, outputs):
                result.outputs[pos] = out
            if details:
                result.tau_a, result.tau_b, result.scales = kernel_details
        return result

    def _run_kernel(self, group: list[ModuleInputs], params: RobustMergeParams, details: bool):
        """-> (outputs per module, (tau_a, tau_b, scales) per item or None)."""
        raise NotImplementedError
