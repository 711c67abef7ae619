"""The CUDA C++ backend: one asynchronous kernel sequence per group of modules
(robustmerge_kernels._cuda, built from csrc/robustmerge/cuda/ when nvcc is found).

As for the CPU backend, this layer owns all memory: ``build_tables`` checks the tensors
(all on one CUDA device), makes them contiguous and allocates the outputs there; the plan
tables stay on the host, where the binding validates them (ValueError before any CUDA
call) and uploads them itself on the caller's current torch CUDA stream, into a workspace
allocated here from torch's caching allocator (so the kernels never allocate beside
torch, which could fail while torch holds the memory cached). Since ``build_tables`` has
checked every tensor's device, the binding is told to skip its per-address driver checks.
Status, thresholds and scales come back in device tensors; reading the status (``.cpu()``,
on the same stream) is the only synchronisation.

The module is built for the architectures in ``_cuda.ARCHITECTURES`` (CMake's list, e.g.
"80-real,86-real,90"): a GPU none of them runs on (a T4 or V100 for the default list) makes
the backend unavailable, so ``auto`` falls back to Triton or the reference.

float64 inputs are not a kernel type: such modules go to the reference implementation.

Matrices of more than ``split_elems`` keys are selected by several blocks per pass instead of
one (csrc/robustmerge/cuda/select.cuh), so a few large matrices (embed_tokens / lm_head
LoRAs) do not leave SMs idle. The threshold is ``_cuda.DEFAULT_SPLIT_ELEMS`` (2^18; the
reasoning is in device_plan.cuh) unless ``RMK_CUDA_SPLIT_ELEMS`` says otherwise (read at
every merge: 0 splits every matrix, a huge value none) or ``CudaBackend(split_elems=...)``
fixes it; every choice gives the same bits.
"""

from __future__ import annotations

import os

import torch

from .base import BackendUnavailable, KernelBackend, ModuleInputs, load_extension
from .tables import build_tables, raise_kernel_status, unpack_details


def _load_extension():
    return load_extension("_cuda", "it is built by `pip install -e .` where nvcc is found")


def arch_runs_on(architectures: str, capability: tuple[int, int]) -> bool:
    """Whether a module built for ``architectures`` (CMake CUDA_ARCHITECTURES, comma
    separated: "80-real" = sm_80 code only, "90-virtual" = compute_90 PTX only, "90" =
    both) has code for a GPU of compute ``capability`` (major, minor).

    sm_XY code runs on GPUs of the same major version and minor >= Y; PTX for compute_XY
    is compiled by the driver for any GPU of capability >= X.Y.
    """
    major, minor = capability
    for arch in filter(None, (a.strip() for a in architectures.split(","))):
        number, _, kind = arch.partition("-")
        if not number.isdigit():
            continue  # "all", "native", "unknown": nothing to decide from
        a_major, a_minor = int(number[:-1]), int(number[-1])
        real = kind in ("", "real")
        virtual = kind in ("", "virtual")
        if real and a_major == major and a_minor <= minor:
            return True
        if virtual and (a_major, a_minor) <= (major, minor):
            return True
    return False


SPLIT_ENV = "RMK_CUDA_SPLIT_ELEMS"
_INT64_MAX = (1 << 63) - 1


def split_elems(default: int, environ=None) -> int:
    """The split threshold of the CUDA selection: ``RMK_CUDA_SPLIT_ELEMS`` when set (an
    integer >= 0; 0 = split every matrix, values past int64 mean never), else ``default``."""
    raw = (os.environ if environ is None else environ).get(SPLIT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{SPLIT_ENV} must be an integer >= 0 (0 splits every matrix), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{SPLIT_ENV} must be an integer >= 0 (0 splits every matrix), got {raw!r}")
    return min(value, _INT64_MAX)


def _check_arch(ext, device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if not arch_runs_on(ext.ARCHITECTURES, capability):
        name = torch.cuda.get_device_name(device)
        raise BackendUnavailable(
            f"the CUDA extension is built for {ext.ARCHITECTURES}, which has no code for {name} "
            f"(compute capability {capability[0]}.{capability[1]}); rebuild with "
            f"RMK_CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES={capability[0]}{capability[1]} or use the triton backend"
        )


def _group_device(group: list[ModuleInputs]) -> torch.device:
    """The device of the group's first tensor; build_tables checks that every tensor is there."""
    device = group[0].a[0].device
    if device.type != "cuda":
        raise ValueError(f"the cuda backend merges CUDA tensors, got {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


class CudaBackend(KernelBackend):
    name = "cuda"
    checks_finite = True  # the selection kernel sees inf/NaN in its first histogram pass, overflow as it stores

    def __init__(self, split_elems: int | None = None):
        """``split_elems``: the split threshold for every merge of this object (None: read
        RMK_CUDA_SPLIT_ELEMS per merge, else ``_cuda.DEFAULT_SPLIT_ELEMS``)."""
        if split_elems is not None and split_elems < 0:
            raise ValueError(f"split_elems must be >= 0 (0 splits every matrix), got {split_elems}")
        self._split_elems = split_elems
        self._ext = _load_extension()
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device is available (torch.cuda.is_available() is False)")
        if self._ext.device_count() < 1:
            raise BackendUnavailable(f"the CUDA extension sees no device ({self._ext.device_error()})")
        _check_arch(self._ext, torch.device("cuda", torch.cuda.current_device()))
        self._checked = set()  # device indices whose architecture was checked

    def _run_kernel(self, group, params, details):
        device = _group_device(group)
        if device.index not in self._checked:
            try:
                _check_arch(self._ext, device)
            except BackendUnavailable as exc:
                raise ValueError(str(exc)) from exc
            self._checked.add(device.index)
        ext = self._ext
        split = self._split_elems if self._split_elems is not None else split_elems(ext.DEFAULT_SPLIT_ELEMS)
        with torch.cuda.device(device):
            tables = build_tables(group, params, device)  # host tables, outputs on `device`
            items, b_scale, modules = tables.items.data_ptr(), tables.b_scale.data_ptr(), tables.modules.data_ptr()
            ws_bytes = ext.workspace_size(items, tables.n_items, b_scale, modules, len(group), split)
            workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=device)  # torch's caching allocator
            n_scales = sum(g.plan.rank * len(g.plan.members) for g in group)
            # Item and module statuses share one buffer: one memset, one copy back.
            flags = torch.zeros(tables.n_items + len(group), dtype=torch.int32, device=device)
            status, module_status = flags[: tables.n_items], flags[tables.n_items :]
            tau = torch.zeros((tables.n_items, 2), dtype=torch.int32, device=device) if details else None
            scales = torch.zeros(n_scales, dtype=torch.float64, device=device) if details else None
            stream = torch.cuda.current_stream(device)
            ext.robustmerge(
                items, tables.n_items, b_scale, modules, len(group), float(params.lam), stream.cuda_stream,
                status.data_ptr(), module_status.data_ptr(), tau.data_ptr() if details else 0,
                scales.data_ptr() if details else 0, device.index, workspace.data_ptr(), ws_bytes, False, split,
            )  # fmt: skip
            # .cpu() runs on the current stream, after the kernels: the one synchronisation.
            # The workspace is freed (returned to torch's cache) after that, on this stream.
            flags_host = flags.cpu()
            del workspace
        status_host, module_status_host = flags_host[: tables.n_items], flags_host[tables.n_items :]
        ok = not bool(status_host.any())
        raise_kernel_status(group, tables, ok, status_host, module_status_host)
        if not details:
            return tables.outputs, None
        return tables.outputs, unpack_details(group, tau.cpu(), scales.cpu())
