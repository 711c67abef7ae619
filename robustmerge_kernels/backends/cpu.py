"""The CPU C++ backend: one kernel call per group of modules (robustmerge_kernels._cpu).

This layer owns all memory and validation: it checks the tensors, makes them contiguous,
allocates the outputs, and passes the plan as two int64 tables (see
csrc/robustmerge/robustmerge_cpu.h for the columns) plus raw addresses. The kernel finds
thresholds by radix selection, row-sum scales and the fused normalised sum, threaded
over (adapter, module) work items; results do not depend on the thread count.

float64 inputs are not a kernel type: such modules go to the reference implementation.

SIMD: one build carries AVX-512, AVX2 and portable code paths and uses the best this CPU
supports; $ROBUSTMERGE_SIMD (avx512, avx2, portable, auto) forces one, and a forced path
the CPU lacks makes the backend unavailable with that reason. Results are bit-identical
on every path. :func:`simd_path` says which one runs.
"""

from __future__ import annotations

import os

import torch

from . import BackendUnavailable
from .tables import ITEM_COLUMNS, MODULE_COLUMNS, KernelBackend, build_tables, raise_kernel_status, unpack_details

ENV_THREADS = "ROBUSTMERGE_NUM_THREADS"
ENV_SIMD = "ROBUSTMERGE_SIMD"

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
    if tuple(_cpu.ITEM_COLUMNS) != ITEM_COLUMNS or tuple(_cpu.MODULE_COLUMNS) != MODULE_COLUMNS:
        raise BackendUnavailable("the C++ extension is stale (table columns differ); rebuild with `pip install -e .`")
    if not hasattr(_cpu, "set_simd_path"):
        raise BackendUnavailable("the C++ extension is stale (no SIMD dispatch); rebuild with `pip install -e .`")
    forced = os.environ.get(ENV_SIMD, "").strip().lower()
    if forced:
        try:
            _cpu.set_simd_path(forced)
        except ValueError as exc:
            raise BackendUnavailable(f"${ENV_SIMD}={forced}: {exc}") from None
    return _cpu


def simd_path() -> str:
    """The SIMD path the CPU kernels use here ("avx512", "avx2" or "portable"), after $ROBUSTMERGE_SIMD."""
    return _load_extension().simd_path()


def simd_summary() -> str:
    """e.g. ``simd avx2 (compiled: avx512 [no cpu support], avx2, portable)``, for ``robustmerge backends``."""
    ext = _load_extension()
    paths = ", ".join(name if ok else f"{name} [no cpu support]" for name, ok in ext.simd_paths().items())
    return f"simd {ext.simd_path()} (compiled: {paths})"


class CpuBackend(KernelBackend):
    name = "cpu"
    checks_finite = True  # the kernel sees inf/NaN in its histogram pass and overflow as it stores

    def __init__(self):
        self._ext = _load_extension()

    def _run_kernel(self, group, params, details):
        tables = build_tables(group, params, torch.device("cpu"))
        status = torch.zeros(tables.n_items, dtype=torch.int32)
        module_status = torch.zeros(len(group), dtype=torch.int32)
        tau = torch.zeros((tables.n_items, 2), dtype=torch.int32)
        scales = torch.zeros(sum(g.plan.rank * len(g.plan.members) for g in group), dtype=torch.float64)
        ok = self._ext.robustmerge(
            tables.items.data_ptr(), tables.n_items, tables.b_scale.data_ptr(), tables.modules.data_ptr(), len(group),
            float(params.lam), get_num_threads(), status.data_ptr(), module_status.data_ptr(),
            tau.data_ptr() if details else 0, scales.data_ptr() if details else 0,
        )  # fmt: skip
        raise_kernel_status(group, tables, ok, status, module_status)
        if not details:
            return tables.outputs, None
        return tables.outputs, unpack_details(group, tau, scales)
