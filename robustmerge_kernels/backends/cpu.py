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
from collections.abc import Sequence

import torch

from ..errors import AdapterError  # a ValueError: callers catching that still do
from .base import BackendUnavailable, KernelBackend, load_extension
from .tables import KERNEL_DTYPES, build_tables, key_to_value, raise_kernel_status, unpack_details

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
            raise AdapterError(f"${ENV_THREADS} must be a positive integer, got {env!r}")
        return int(env)
    return max(1, torch.get_num_threads())


def _load_extension():
    ext = load_extension("_cpu", "run `pip install -e .`")
    if not hasattr(ext, "set_simd_path"):
        raise BackendUnavailable("the C++ extension is stale (no SIMD dispatch); rebuild with `pip install -e .`")
    forced = os.environ.get(ENV_SIMD, "").strip().lower()
    if forced:
        try:
            ext.set_simd_path(forced)
        except ValueError as exc:
            raise BackendUnavailable(f"${ENV_SIMD}={forced}: {exc}") from None
    return ext


def extension_available() -> bool:
    try:
        _load_extension()
    except BackendUnavailable:
        return False
    return True


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


def thresholds(xs: Sequence[torch.Tensor], ks: Sequence[int]) -> list[torch.Tensor]:
    """The ``ks[i]``-th smallest ``|x|`` (1-based, ``1 <= k <= numel``) of each CPU tensor of a
    kernel dtype, as a 0-dim tensor of that dtype: exactly ``kthvalue``, by the kernel's
    radix selection, all tensors in one threaded call. For the baseline methods' top-k masks.
    Raises ValueError naming the position of a tensor that holds inf/NaN."""
    ext = _load_extension()
    keep = [x.detach().contiguous() for x in xs]  # the table holds addresses: keep them alive
    for i, (x, k) in enumerate(zip(keep, ks)):
        if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"tensor {i}: the CPU kernel reads float32/float16/bfloat16 CPU tensors, got {x.dtype} on {x.device}"
            )
        if not 1 <= k <= x.numel():
            raise ValueError(f"tensor {i}: rank {k} is outside 1..{x.numel()}")
    if not keep:
        return []
    table = torch.tensor(
        [[x.data_ptr(), KERNEL_DTYPES[x.dtype], x.numel(), k] for x, k in zip(keep, ks)], dtype=torch.int64
    )
    keys = torch.zeros(len(keep), dtype=torch.int32)
    status = torch.zeros(len(keep), dtype=torch.int32)
    if not ext.thresholds(table.data_ptr(), len(keep), get_num_threads(), keys.data_ptr(), status.data_ptr()):
        raise ValueError(f"tensor {int(torch.nonzero(status)[0])}: contains NaN/Inf values")
    return [key_to_value(key, x.dtype) for x, key in zip(keep, (keys.to(torch.int64) & 0xFFFFFFFF).tolist())]
