"""The kernel backends as the unified suite (test_kernels.py) sees them: one object per
backend that places inputs on the backend's device, runs it, and brings results back to
the CPU for comparison, so every shared test is written once.

Devices: the cpu backend and Triton in interpreter mode take CPU tensors; compiled Triton
and the CUDA backend take CUDA tensors. Whether Triton is interpreted is decided by
TRITON_INTERPRET (tests/conftest.py sets it only where there is no nvidia-smi).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import _oracle
import pytest
import torch
from _cases import assert_close_to_exact, data_scale, kernel_masks, module_inputs, random_module

from robustmerge_kernels.backends.cpu import CpuBackend
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.reference import robustmerge_module

BACKENDS = ["cpu", "triton", "cuda"]


def triton_interpreted() -> bool:
    from robustmerge_kernels.backends.triton.backend import interpreter_mode

    return interpreter_mode()


def triton_mode_line() -> str:
    """One line for the pytest header: how the Triton kernels run in this session."""
    try:
        import triton
    except ImportError as exc:
        return f"triton kernels: not tested (triton not importable: {exc})"
    interp = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
    if interp:
        why = "no nvidia-smi on this machine" if shutil.which("nvidia-smi") is None else "TRITON_INTERPRET set"
        return f"triton kernels: interpreter, INTERPRETED on the CPU (TRITON_INTERPRET=1, {why}); triton {triton.__version__}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device: triton tests skip"
    return f"triton kernels: compiled (TRITON_INTERPRET unset) on {gpu}; triton {triton.__version__}"


@dataclass
class BackendUnderTest:
    name: str
    impl: object  # the backend instance
    device: torch.device
    interpreted: bool = False  # Triton's interpreter: slow, so tests keep shapes small

    def inputs(self, a, b, b_scale=None, out_dtype=None, name="m"):
        """ModuleInputs with a, b (CPU tensors) copied to the backend's device."""
        return module_inputs(a, b, b_scale, out_dtype, name, device=self.device)

    def run(self, modules, params, details=True):
        """KernelDetails with outputs, thresholds and scales on the CPU."""
        det = self.impl.run(modules, params, details=details)
        det.outputs = [(x.cpu(), y.cpu()) for x, y in det.outputs]
        det.tau_a = [t.cpu() for t in det.tau_a]
        det.tau_b = [t.cpu() for t in det.tau_b]
        det.scales = [s.cpu() for s in det.scales]
        return det

    def pairs(self, pairs):
        """(state_dict, config) pairs with the tensors on the backend's device."""
        return [({k: v.to(self.device) for k, v in sd.items()}, cfg) for sd, cfg in pairs]


def make_backend(name: str, monkeypatch) -> BackendUnderTest:
    """The backend ``name`` or pytest.skip with the reason it cannot run here."""
    from robustmerge_kernels import backends
    from robustmerge_kernels.backends import BackendUnavailable

    if name == "cpu":
        try:
            return BackendUnderTest("cpu", CpuBackend(), torch.device("cpu"))
        except BackendUnavailable as exc:
            pytest.fail(f"the cpu backend must run everywhere: {exc}")
    if name == "triton":
        try:
            from robustmerge_kernels.backends.triton.backend import TritonBackend

            impl = TritonBackend()
        except (ImportError, BackendUnavailable) as exc:
            pytest.skip(f"triton backend unavailable: {exc}")
        if impl.interpret:
            # merge() on CPU tensors picks backends serving "cpu": register triton for it
            # (interpreter only), so the API-level tests run it too.
            entry = backends._REGISTRY["triton"]
            monkeypatch.setitem(
                backends._REGISTRY, "triton", backends._Entry(entry.factory, ("cpu", "cuda"), entry.priority)
            )
            return BackendUnderTest("triton", impl, torch.device("cpu"), interpreted=True)
        return BackendUnderTest("triton", impl, torch.device("cuda"))
    if name in ("cuda", "cuda-split"):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
        try:
            from robustmerge_kernels.backends.cuda import SPLIT_ENV, CudaBackend

            # cuda-split: the split selection on every matrix (merge() builds its own
            # backend object, which reads the environment).
            impl = CudaBackend(split_elems=0 if name == "cuda-split" else None)
        except (ImportError, BackendUnavailable) as exc:
            pytest.skip(f"cuda backend unavailable: {exc}")
        if name == "cuda-split":
            monkeypatch.setenv(SPLIT_ENV, "0")
        return BackendUnderTest("cuda", impl, torch.device("cuda"))
    raise KeyError(name)


def check_against_reference(backend, a, b, density=0.2, clamp_quantile=0.8, lam=2.0, b_scale=None, out_dtype=None):
    """a, b on the CPU; the merge runs on the backend's device; compared on the CPU."""
    params = RobustMergeParams(density, clamp_quantile, lam)
    det = backend.run([backend.inputs(a, b, b_scale, out_dtype)], params)
    ref = robustmerge_module(a, b, params, b_scale, out_dtype)
    what = backend.name
    assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a), f"{what}: mask of A differs from the reference"
    assert torch.equal(kernel_masks(b, det.tau_b), ref.mask_b), f"{what}: mask of B differs from the reference"
    torch.testing.assert_close(torch.stack(det.scales), ref.scales.double(), rtol=1e-12, atol=0.0)
    out_a, out_b = det.outputs[0]
    dtype = out_dtype or a[0].dtype
    assert out_a.dtype == dtype and out_b.dtype == dtype
    if out_dtype is None:  # the oracle rounds to the input dtype
        exp = _oracle.robustmerge(a, b, density, clamp_quantile, lam, b_scale)
        assert_close_to_exact(out_a, exp.a, dtype, data_scale(a, lam), lam, f"{what} A vs oracle")
        assert_close_to_exact(out_b, exp.b, dtype, data_scale(b, lam, b_scale), lam, f"{what} B vs oracle")
    assert_close_to_exact(out_a, ref.a.double(), dtype, data_scale(a, lam), lam, f"{what} A vs reference")
    assert_close_to_exact(out_b, ref.b.double(), dtype, data_scale(b, lam, b_scale), lam, f"{what} B vs reference")
    if backend.name == "cuda":
        # Same thresholds and float32 order of operations as the CPU kernel: A* bit-identical.
        cpu = CpuBackend().run([module_inputs(a, b, b_scale, out_dtype)], params, details=True)
        for tc, tg in zip(cpu.tau_a + cpu.tau_b, det.tau_a + det.tau_b):
            assert torch.equal(tc, tg), "threshold differs from the cpu kernel"
        assert torch.equal(cpu.outputs[0][0].view(torch.uint8), out_a.view(torch.uint8)), (
            "A* differs from the cpu kernel"
        )
    return det


def check_many_modules(backend):
    """Modules of different ranks, shapes, member counts, input and output dtypes in one
    group; each module's result equals the reference and the same module merged alone."""
    params = RobustMergeParams(density=0.3, clamp_quantile=0.5, lam=1.5)
    specs = [  # (T, r, n, m, input dtypes, out dtype, b_scale)
        (3, 4, 20, 12, [torch.float32] * 3, torch.float32, None),
        (2, 8, 33, 7, [torch.bfloat16] * 2, torch.bfloat16, [1.0, 2.5]),
        (4, 2, 9, 30, [torch.float16] * 4, torch.float16, None),
        (3, 5, 16, 16, [torch.float32, torch.bfloat16, torch.float16], torch.float32, [0.5, 1.0, 3.0]),
        (1, 3, 7, 5, [torch.float16], torch.float64, None),
    ]
    mods, raw = [], []
    for i, (T, r, n, m, dts, od, bs) in enumerate(specs):
        a, b = random_module(100 + i, T=T, r=r, n=n, m=m, dtype=torch.float64)
        a = [x.to(d) for x, d in zip(a, dts)]
        b = [x.to(d) for x, d in zip(b, reversed(dts))]
        mods.append(backend.inputs(a, b, bs, od, name=f"m{i}"))
        raw.append((a, b, bs, od))
    det = backend.run(mods, params)
    item = 0
    for i, (a, b, bs, od) in enumerate(raw):
        T = len(a)
        out_a, out_b = det.outputs[i]
        assert out_a.dtype == od and out_b.dtype == od
        ref = robustmerge_module(a, b, params, bs, od)
        assert torch.equal(kernel_masks(a, det.tau_a[item : item + T]), ref.mask_a), f"module {i} A mask"
        assert torch.equal(kernel_masks(b, det.tau_b[item : item + T]), ref.mask_b), f"module {i} B mask"
        torch.testing.assert_close(torch.stack(det.scales[item : item + T]), ref.scales.double(), rtol=1e-12, atol=0.0)
        rtol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[od]
        torch.testing.assert_close(out_a.double(), ref.a.double(), rtol=rtol, atol=1e-6)
        torch.testing.assert_close(out_b.double(), ref.b.double(), rtol=rtol, atol=1e-6)
        alone = backend.run([mods[i]], params)  # one module alone: the same bits
        assert torch.equal(alone.outputs[0][0], out_a) and torch.equal(alone.outputs[0][1], out_b)
        item += T
