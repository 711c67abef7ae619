"""What only the Triton backend has: interpreter or compiled mode (TRITON_INTERPRET; the
session header says which), the multi-program, grid-stride and multi-block paths taken
with tiny block sizes, its registration, and the device it accepts. The shared kernel
suite (every backend against the reference) is tests/test_kernels.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported, only where there is no nvidia-smi);
on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the triton backend is not tested")

from _backends import BackendUnderTest, check_many_modules, triton_mode_line  # noqa: E402
from _backends import check_against_reference as shared_check  # noqa: E402
from _cases import KERNEL_DTYPES, KERNEL_IDS, random_module  # noqa: E402
from _cases import module_inputs as shared_module_inputs  # noqa: E402

from robustmerge_kernels import backends  # noqa: E402
from robustmerge_kernels.backends import BackendUnavailable, ModuleInputs  # noqa: E402
from robustmerge_kernels.backends.triton import backend as tb  # noqa: E402
from robustmerge_kernels.params import RobustMergeParams  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]


try:
    BACKEND = tb.TritonBackend()
except BackendUnavailable as exc:  # e.g. TRITON_INTERPRET=0 on a machine without a GPU
    pytest.skip(f"triton backend unavailable: {exc}", allow_module_level=True)
DEVICE = torch.device("cpu") if BACKEND.interpret else torch.device("cuda")


TRITON = BackendUnderTest("triton", BACKEND, DEVICE, interpreted=BACKEND.interpret)


def module_inputs(a, b, b_scale=None, out_dtype=None, name="m"):
    return shared_module_inputs(a, b, b_scale, out_dtype, name, device=DEVICE)


def run_triton(modules, params, details=True):
    return TRITON.run(modules, params, details=details)


def check_against_reference(a, b, **kw):
    return shared_check(TRITON, a, b, **kw)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and few keys per program, so small matrices take the multi-program,
    grid-stride and multi-block paths of every kernel."""
    monkeypatch.setattr(tb, "HIST_BLOCK", 64)
    monkeypatch.setattr(tb, "KEYS_PER_PROGRAM", 128)
    monkeypatch.setattr(tb, "MAX_PROGRAMS_PER_MATRIX", 3)
    monkeypatch.setattr(tb, "FUSE_BLOCK", 32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
def test_grid_stride_paths_match_reference(dtype, small_blocks):
    a, b = random_module(11, T=3, r=5, n=150, m=130, dtype=dtype)  # 750 / 650 keys: > 3 programs x 64
    a[1][2, :40] = a[1][2, 0]  # ties across blocks
    check_against_reference(a, b, density=0.3)
    ties = [(x * 64).round() / 64 for x in random_module(12, T=2, r=4, n=200, m=90, dtype=torch.float64)[0]]
    check_against_reference([x.to(dtype) for x in ties], [x.t().contiguous().to(dtype) for x in ties])


def test_many_modules_mixed_dtypes_one_launch(small_blocks):
    """The shared many-modules check, with every kernel on its multi-program paths."""
    check_many_modules(TRITON)


def test_mode_is_explicit_and_not_forced_on_a_gpu_machine():
    """The header line says how the kernels run; with nvidia-smi present nothing in the
    test setup sets TRITON_INTERPRET, so a GPU machine runs the compiled kernels."""
    assert BACKEND.interpret == tb.interpreter_mode()
    assert ("INTERPRETED" in triton_mode_line()) == BACKEND.interpret
    if shutil.which("nvidia-smi") is None:
        assert BACKEND.interpret and DEVICE.type == "cpu"
    elif os.environ.get("TRITON_INTERPRET") is None:
        assert not BACKEND.interpret and DEVICE.type == "cuda"


def test_registered_for_cuda_and_unavailable_without_gpu_or_interpreter(monkeypatch):
    assert "triton" in backends.registered_backends()
    assert backends.available_backends("cuda")["triton"] == "ok"  # interpreter mode here, or a GPU
    assert "triton" not in backends.available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        assert tb.TritonBackend().interpret is False
    else:
        with pytest.raises(BackendUnavailable, match="no CUDA device"):
            tb.TritonBackend()
        assert "no CUDA device" in backends.available_backends("cuda")["triton"]


def test_refuses_tensors_on_the_wrong_device():
    if not BACKEND.interpret:
        pytest.skip("interpreter mode only")
    a, b = random_module(0, T=1, r=2, n=3, m=3, dtype=torch.float32)
    meta = ModuleInputs(module_inputs(a, b).plan, [a[0].to("meta")], [b[0].to("meta")])
    with pytest.raises(ValueError, match="CPU tensors"):
        BACKEND.run([meta], RobustMergeParams())
