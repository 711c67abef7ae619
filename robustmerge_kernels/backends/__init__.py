"""Backend registry: which implementation runs a merge, per device.

Each backend registers a factory, the device types it serves and a priority. ``auto``
picks the highest-priority available backend for the tensors' device; the environment
variable ``ROBUSTMERGE_BACKEND`` overrides ``auto`` (e.g. to force ``reference`` while
debugging a kernel). An explicitly named backend that cannot run raises with its reason.

What a backend is (the Protocol, its inputs and errors) lives in :mod:`.base`; the plan
tables the compiled backends read, in :mod:`.tables`. To add a backend: implement
``robustmerge(group, params)`` (usually by subclassing ``base.KernelBackend``) and call
:func:`register_backend` with a factory that raises ``BackendUnavailable`` where it cannot run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AdapterError
from .base import Backend, BackendUnavailable, ModuleInputs, NonFiniteInput, OutputOverflow

__all__ = [
    "ENV_VAR", "Backend", "BackendUnavailable", "ModuleInputs", "NonFiniteInput", "OutputOverflow",
    "available_backends", "get_backend", "register_backend", "registered_backends",
]  # fmt: skip

ENV_VAR = "ROBUSTMERGE_BACKEND"


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[], Backend]
    devices: tuple[str, ...]
    priority: int
    # Devices served only when the backend is named, never by ``auto`` (e.g. triton on CPU
    # tensors in interpreter mode): a predicate, as the answer can depend on the environment.
    explicit: Callable[[str], bool] | None = None

    def serves(self, device: str, named: bool) -> bool:
        return device in self.devices or (named and self.explicit is not None and self.explicit(device))


_REGISTRY: dict[str, _Entry] = {}


def register_backend(
    name: str,
    factory: Callable[[], Backend],
    devices: tuple[str, ...],
    priority: int = 0,
    explicit: Callable[[str], bool] | None = None,
) -> None:
    """``explicit(device)``: True for further devices the backend serves when named only."""
    _REGISTRY[name] = _Entry(factory, devices, priority, explicit)


def registered_backends() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)


def available_backends(device: str = "cpu") -> dict[str, str]:
    """{name: "ok" or the reason it cannot run} for backends serving ``device``."""
    status = {}
    for name in registered_backends():
        entry = _REGISTRY[name]
        if device not in entry.devices:
            continue
        try:
            entry.factory()
            status[name] = "ok"
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def get_backend(name: str = "auto", device: str = "cpu") -> Backend:
    """Resolve ``name`` (or ``auto`` / $ROBUSTMERGE_BACKEND) to a backend for ``device``."""
    if name == "auto":
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if name != "auto":
        entry = _REGISTRY.get(name)
        if entry is None:
            raise AdapterError(f"unknown backend {name!r}; registered: {', '.join(registered_backends())}")
        if not entry.serves(device, named=True):
            raise AdapterError(f"backend {name!r} does not run on {device!r} tensors (it serves {entry.devices})")
        try:
            return entry.factory()
        except BackendUnavailable as exc:
            raise AdapterError(f"backend {name!r} is unavailable: {exc}") from exc
    reasons = []
    for candidate in registered_backends():
        entry = _REGISTRY[candidate]
        if device in entry.devices:
            try:
                return entry.factory()
            except BackendUnavailable as exc:
                reasons.append(f"{candidate}: {exc}")
    raise AdapterError(f"no backend runs on {device!r} tensors ({'; '.join(reasons) or 'none registered'})")


def _reference_factory() -> Backend:
    from .reference import ReferenceBackend

    return ReferenceBackend()


def _cpu_factory() -> Backend:
    from .cpu import CpuBackend

    return CpuBackend()


def _triton_factory() -> Backend:
    try:
        from .triton.backend import TritonBackend
    except ImportError as exc:
        raise BackendUnavailable(f"triton backend not importable ({exc})") from exc
    return TritonBackend()  # raises BackendUnavailable itself without triton or a GPU


def _triton_explicit(device: str) -> bool:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (slowly): merge(..., backend="triton")
    # may use it there, `auto` never picks it for CPU tensors.
    from .triton import interpreter_mode

    return device == "cpu" and interpreter_mode()


def _cuda_factory() -> Backend:
    try:
        from .cuda import CudaBackend
    except ImportError as exc:
        raise BackendUnavailable(f"cuda backend not importable ({exc})") from exc
    return CudaBackend()  # raises BackendUnavailable itself without the extension or a GPU


# The pure-PyTorch default runs everywhere torch does; compiled backends outrank it.
register_backend("reference", _reference_factory, devices=("cpu", "cuda", "mps", "xpu"), priority=0)
register_backend("cpu", _cpu_factory, devices=("cpu",), priority=10)
# On GPUs the ahead-of-time CUDA kernels are preferred; Triton serves where they are absent.
register_backend("triton", _triton_factory, devices=("cuda",), priority=20, explicit=_triton_explicit)
register_backend("cuda", _cuda_factory, devices=("cuda",), priority=30)
