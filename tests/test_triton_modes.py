"""How the Triton backend is reached in each mode: the registry serves CPU tensors with
it only when it is named and TRITON_INTERPRET=1 (``auto`` never picks it there), and the
public merge() path works in interpreter mode. The mode itself is printed in pytest's
header (conftest.py), so a GPU log shows whether the kernels were compiled.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lora_pair, pytest_report_header

import robustmerge_kernels as rk
from robustmerge_kernels.backends import available_backends, get_backend
from robustmerge_kernels.backends.triton import interpreter_mode

pytest.importorskip("triton", reason="triton is not installed: the triton backend is not tested")
interpreter = pytest.mark.skipif(not interpreter_mode(), reason="runs where the kernels are interpreted (no GPU)")


def test_report_header_names_the_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in pytest_report_header(None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "compiled" in pytest_report_header(None)


@interpreter
def test_named_triton_serves_cpu_tensors_in_interpreter_mode_only(monkeypatch):
    assert get_backend("triton", "cpu").name == "triton"
    assert get_backend("auto", "cpu").name != "triton"
    assert "triton" not in available_backends("cpu")  # what `auto` chooses from
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(rk.AdapterError, match="does not run on 'cpu'"):
        get_backend("triton", "cpu")


@interpreter
def test_merge_api_runs_the_triton_kernels_on_cpu_tensors():
    adapters = [lora_pair(seed, r=4, n=12, m=10) for seed in (1, 2, 3)]
    got = rk.merge(adapters, backend="triton")
    ref = rk.merge(adapters, backend="reference")
    assert got.report.backend == "triton"
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "version, bits", [("3.5.1", 8), ("3.6.0", 8), ("3.7.0", 11), ("3.10.0+git1234", 11), ("4.0", 11)]
)
def test_digit_width_follows_the_histogram_lowering(monkeypatch, version, bits):
    from robustmerge_kernels.backends.triton.select import digit_bits, passes

    monkeypatch.delenv("RMK_TRITON_RADIX_BITS", raising=False)
    assert digit_bits(version) == bits
    assert passes(bits, wide=False) == 2 and passes(bits, wide=True) == (3 if bits == 11 else 4)
    monkeypatch.setenv("RMK_TRITON_RADIX_BITS", "5")
    assert digit_bits(version) == 5
    monkeypatch.setenv("RMK_TRITON_RADIX_BITS", "12")
    with pytest.raises(ValueError, match="4..11"):
        digit_bits(version)


@interpreter
@pytest.mark.parametrize("bits", [4, 7, 11])
def test_thresholds_exact_for_any_digit_width(monkeypatch, bits):
    """Every digit width gives the reference's thresholds (float32: 3 to 8 passes)."""
    from _cases import kernel_masks, module_inputs, random_module

    from robustmerge_kernels.backends.triton.backend import TritonBackend
    from robustmerge_kernels.params import RobustMergeParams
    from robustmerge_kernels.reference import robustmerge_module

    monkeypatch.setenv("RMK_TRITON_RADIX_BITS", str(bits))
    params = RobustMergeParams(density=0.3)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = random_module(bits, T=2, r=3, n=40, m=30, dtype=dtype)
        a[0][1, :10] = a[0][1, 0]  # ties at the threshold
        det = TritonBackend().run([module_inputs(a, b)], params, details=True)
        ref = robustmerge_module(a, b, params)
        assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a)
        assert torch.equal(kernel_masks(b, det.tau_b), ref.mask_b)


@interpreter
def test_unaligned_inputs_take_the_scalar_loads(monkeypatch):
    """Inputs that are views at odd offsets (not 16-byte aligned) give the same thresholds
    as aligned copies: the kernels only use vector loads when every address allows them."""
    from _cases import module_inputs, random_module

    from robustmerge_kernels.backends.triton import backend as tb
    from robustmerge_kernels.params import RobustMergeParams

    monkeypatch.setattr(tb, "HIST_BLOCK", 64)  # whole blocks and a tail in a small matrix
    params = RobustMergeParams(density=0.4)
    a, b = random_module(7, T=2, r=4, n=50, m=40, dtype=torch.bfloat16)
    shifted_a = [torch.cat([torch.zeros(1, dtype=x.dtype), x.flatten()])[1:].view_as(x) for x in a]
    shifted_b = [torch.cat([torch.zeros(3, dtype=x.dtype), x.flatten()])[3:].view_as(x) for x in b]
    assert all(x.data_ptr() % 16 for x in shifted_a + shifted_b)
    backend = tb.TritonBackend()
    odd = backend.run([module_inputs(shifted_a, shifted_b)], params, details=True)
    even = backend.run([module_inputs(a, b)], params, details=True)
    for x, y in zip(odd.tau_a + odd.tau_b, even.tau_a + even.tau_b):
        assert torch.equal(x, y)
    for (xa, xb), (ya, yb) in zip(odd.outputs, even.outputs):
        assert torch.equal(xa, ya) and torch.equal(xb, yb)


@interpreter
@pytest.mark.parametrize("cap", [3, 40, 100_000])  # most matrices overflow / some fit / all fit
@pytest.mark.parametrize("bits", [8, 11])
def test_float32_candidates_captured_or_not_give_the_same_thresholds(monkeypatch, cap, bits):
    from _cases import kernel_masks, module_inputs, random_module

    from robustmerge_kernels.backends.triton import backend as tb
    from robustmerge_kernels.params import RobustMergeParams
    from robustmerge_kernels.reference import robustmerge_module

    monkeypatch.setenv("RMK_TRITON_RADIX_BITS", str(bits))
    monkeypatch.setattr(tb, "CANDIDATES_PER_MATRIX", cap)
    monkeypatch.setattr(tb, "HIST_BLOCK", 64)  # several blocks and programs capture into one slot
    monkeypatch.setattr(tb, "KEYS_PER_PROGRAM", 128)
    params = RobustMergeParams(density=0.35)
    a, b = random_module(3 * cap + bits, T=2, r=6, n=70, m=50, dtype=torch.float32)
    a[1][0, :30] = a[1][0, 3]  # ties
    b[0][:, 0] = 0.0  # zeros
    det = tb.TritonBackend().run([module_inputs(a, b)], params, details=True)
    ref = robustmerge_module(a, b, params)
    assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a)
    assert torch.equal(kernel_masks(b, det.tau_b), ref.mask_b)
