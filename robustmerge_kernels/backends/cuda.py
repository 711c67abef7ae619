"""The CUDA C++ backend: one asynchronous kernel sequence per group of modules
(robustmerge_kernels._cuda, built from csrc/robustmerge/cuda/ when nvcc is found).

As for the CPU backend, this layer owns all memory: ``build_tables`` checks the tensors
(all on one CUDA device), makes them contiguous and allocates the outputs there; the plan
tables stay on the host, where the binding validates them (ValueError before any CUDA
call) and uploads them itself on the caller's current torch CUDA stream. Status,
thresholds and scales come back in device tensors; reading the status (``.cpu()``, on the
same stream) is the only synchronisation.

float64 inputs are not a kernel type: such modules go to the reference implementation.
"""

from __future__ import annotations

import torch

from .base import BackendUnavailable, KernelBackend, ModuleInputs, load_extension
from .tables import build_tables, raise_kernel_status, unpack_details


def _load_extension():
    return load_extension("_cuda", "it is built by `pip install -e .` where nvcc is found")


def _group_device(group: list[ModuleInputs]) -> torch.device:
    devices = {x.device for g in group for x in (*g.a, *g.b)}
    if len(devices) != 1:
        raise ValueError(
            f"the cuda backend needs every tensor of a group on one device, got {sorted(map(str, devices))}"
        )
    (device,) = devices
    if device.type != "cuda":
        raise ValueError(f"the cuda backend merges CUDA tensors, got {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


class CudaBackend(KernelBackend):
    name = "cuda"
    checks_finite = True  # the selection kernel sees inf/NaN in its first histogram pass, overflow as it stores

    def __init__(self):
        self._ext = _load_extension()
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device is available (torch.cuda.is_available() is False)")
        if self._ext.device_count() < 1:
            raise BackendUnavailable(f"the CUDA extension sees no device ({self._ext.device_error()})")

    def _run_kernel(self, group, params, details):
        device = _group_device(group)
        with torch.cuda.device(device):
            tables = build_tables(group, params, device)  # host tables, outputs on `device`
            n_scales = sum(g.plan.rank * len(g.plan.members) for g in group)
            status = torch.zeros(tables.n_items, dtype=torch.int32, device=device)
            module_status = torch.zeros(len(group), dtype=torch.int32, device=device)
            tau = torch.zeros((tables.n_items, 2), dtype=torch.int32, device=device) if details else None
            scales = torch.zeros(n_scales, dtype=torch.float64, device=device) if details else None
            stream = torch.cuda.current_stream(device)
            self._ext.robustmerge(
                tables.items.data_ptr(), tables.n_items, tables.b_scale.data_ptr(), tables.modules.data_ptr(),
                len(group), float(params.lam), stream.cuda_stream, status.data_ptr(), module_status.data_ptr(),
                tau.data_ptr() if details else 0, scales.data_ptr() if details else 0, device.index,
            )  # fmt: skip
            # .cpu() runs on the current stream, after the kernels: the one synchronisation.
            status_host, module_status_host = status.cpu(), module_status.cpu()
        ok = not bool(status_host.any())
        raise_kernel_status(group, tables, ok, status_host, module_status_host)
        if not details:
            return tables.outputs, None
        return tables.outputs, unpack_details(group, tau.cpu(), scales.cpu())
