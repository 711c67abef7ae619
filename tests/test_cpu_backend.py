"""The CPU C++ backend against the reference: masks bit-identical (derived from the
kernel's own thresholds), scales and merged factors within dtype tolerance, results
independent of the thread count and schedule, bad input refused."""

from __future__ import annotations

import pytest
import torch
from _cases import (
    CASES, KERNEL_DTYPES, KERNEL_IDS, TOLERANCES, assert_close_to_exact, data_scale, kernel_masks, make_case,
    module_inputs, property_module, random_module, subnormal_ints,
)
from conftest import lora_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _oracle
import robustmerge_kernels as rk
from robustmerge_kernels.backends import cpu as cpu_backend
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.reference import robustmerge_module





@pytest.fixture
def threads():
    """Set the kernel thread count for one test; restored afterwards."""
    yield cpu_backend.set_num_threads
    cpu_backend.set_num_threads(None)


def run_cpu(modules, params, details=True):
    return cpu_backend.CpuBackend().run(modules, params, details=details)




def check_against_reference(a, b, density=0.2, clamp_quantile=0.8, lam=2.0, b_scale=None):
    params = RobustMergeParams(density, clamp_quantile, lam)
    det = run_cpu([module_inputs(a, b, b_scale)], params)
    ref = robustmerge_module(a, b, params, b_scale)
    assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a), "mask of A differs from the reference"
    assert torch.equal(kernel_masks(b, det.tau_b), ref.mask_b), "mask of B differs from the reference"
    torch.testing.assert_close(torch.stack(det.scales), ref.scales.double(), rtol=1e-12, atol=0.0)
    out_a, out_b = det.outputs[0]
    dtype = a[0].dtype
    exp = _oracle.robustmerge(a, b, density, clamp_quantile, lam, b_scale)
    assert_close_to_exact(out_a, exp.a, dtype, data_scale(a, lam), lam, "cpu A vs oracle")
    assert_close_to_exact(out_b, exp.b, dtype, data_scale(b, lam, b_scale), lam, "cpu B vs oracle")
    assert_close_to_exact(out_a, ref.a.double(), dtype, data_scale(a, lam), lam, "cpu A vs reference")
    assert_close_to_exact(out_b, ref.b.double(), dtype, data_scale(b, lam, b_scale), lam, "cpu B vs reference")
    return det, ref


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", CASES)
def test_adversarial_cases_match_reference(case, dtype):
    a, b, kw = make_case(case, dtype)
    if case in ("huge", "huge_mixed"):  # merged values past the dtype's range are refused, not compared
        kw = {**kw, "lam": 1.0 / len(a)}
    check_against_reference(a, b, **kw)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("r", [1, 2, 3, 16, 17])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 5), (16, 64), (33, 9), (600, 3), (40, 1100)])
def test_shape_grid(r, n, m, dtype):
    """Odd sizes, SIMD tails (n = 33), A* and B* spanning several fusion blocks (> 8192 values)."""
    a, b = random_module(r * 1000 + n + m, T=3, r=r, n=n, m=m, dtype=dtype)
    check_against_reference(a, b, density=0.25)


@pytest.mark.parametrize("b_scale", [[1.0, 4.0, 0.3], [2.0, 2.0, 2.0]])
def test_b_scale_folded_after_masking(b_scale):
    a, b = random_module(3, T=3, r=4, n=20, m=12, dtype=torch.float32)
    check_against_reference(a, b, b_scale=b_scale)


def test_mixed_input_dtypes_in_one_module():
    a, b = random_module(5, T=3, r=4, n=20, m=12, dtype=torch.float64)
    a = [a[0].float(), a[1].bfloat16(), a[2].half()]
    b = [b[0].half(), b[1].float(), b[2].bfloat16()]
    params = RobustMergeParams()
    det = run_cpu([module_inputs(a, b, out_dtype=torch.float32)], params)
    ref = robustmerge_module(a, b, params, out_dtype=torch.float32)
    assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a)
    assert torch.equal(kernel_masks(b, det.tau_b), ref.mask_b)
    torch.testing.assert_close(det.outputs[0][0], ref.a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(det.outputs[0][1], ref.b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes(out_dtype):
    """Stores round to nearest even exactly as torch's .to(dtype) does, subnormals included."""
    a, b = random_module(9, T=4, r=8, n=64, m=48, dtype=torch.float32)
    a[0][0, :8] = torch.tensor([1e-6, 3e-8, 6e-8, 9e-8, 65519.0, 65504.0, 1.0009765625, 2.0**-24 * 1.5])
    params = RobustMergeParams(density=1.0, lam=1.0)
    det = run_cpu([module_inputs(a, b, out_dtype=out_dtype)], params)
    ref = robustmerge_module(a, b, params, out_dtype=out_dtype)
    assert torch.equal(det.outputs[0][0], ref.a)
    torch.testing.assert_close(det.outputs[0][1], ref.b, rtol=TOLERANCES[out_dtype].rtol, atol=1e-7)


def test_float64_modules_use_the_reference_path():
    a, b = random_module(1, T=2, r=4, n=10, m=6, dtype=torch.float64)
    out = cpu_backend.CpuBackend().robustmerge([module_inputs(a, b)], RobustMergeParams())
    ref = robustmerge_module(a, b, RobustMergeParams())
    assert torch.equal(out[0][0], ref.a) and torch.equal(out[0][1], ref.b)


def _many_modules(count, T, dtype, seed=0):
    mods = []
    for i in range(count):
        a, b = random_module(seed + i, T=T, r=8, n=48 + i, m=40 + 3 * i, dtype=dtype)
        mods.append(module_inputs(a, b, name=f"m{i}"))
    return mods


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
def test_bit_identical_whatever_the_thread_count_and_schedule(dtype, threads):
    """Module-per-task (many modules) and matrix/block-per-task (few) give the same bits."""
    params = RobustMergeParams()
    mods = _many_modules(12, T=5, dtype=dtype)
    results = []
    for n in (1, 2, 3, 8, 64):  # 12 modules >= 2 * threads for 1..3 threads (module tasks), not for 8, 64
        threads(n)
        results.append(run_cpu(mods, params))
    for other in results[1:]:
        for (a0, b0), (a1, b1) in zip(results[0].outputs, other.outputs):
            assert torch.equal(a0.view(torch.int16 if a0.itemsize == 2 else torch.int32),
                               a1.view(torch.int16 if a1.itemsize == 2 else torch.int32))  # fmt: skip
            assert torch.equal(b0, b1)
        assert all(torch.equal(s0, s1) for s0, s1 in zip(results[0].scales, other.scales))


def test_exact_with_flush_denormal_enabled():
    """torch.set_flush_denormal(True) sets FTZ/DAZ; the kernel still sees subnormals exactly."""
    g = torch.Generator().manual_seed(0)
    a = [subnormal_ints(g, (4, 40), torch.float32) for _ in range(3)]
    b = [subnormal_ints(g, (30, 4), torch.float32) for _ in range(3)]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        params = RobustMergeParams(lam=1.0)
        det = run_cpu([module_inputs(a, b)], params)
    finally:
        torch.set_flush_denormal(False)
    ref = robustmerge_module(a, b, params)
    assert torch.equal(kernel_masks(a, det.tau_a), ref.mask_a)
    assert torch.equal(det.outputs[0][0], ref.a)
    assert (det.outputs[0][0] != 0).any()


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 6), r=st.integers(1, 20), n=st.integers(1, 70), m=st.integers(1, 70),
    density=st.floats(0.01, 1.0), clamp_quantile=st.floats(0.0, 1.0), lam=st.floats(-3.0, 3.0),
    dtype=st.sampled_from(KERNEL_DTYPES), kind=st.sampled_from(["random", "ties", "sparse"]), seed=st.integers(0, 10**6),
)  # fmt: skip
def test_property_masks_and_outputs_match_reference(T, r, n, m, density, clamp_quantile, lam, dtype, kind, seed):
    check_against_reference(*property_module(T, r, n, m, dtype, kind, seed), density, clamp_quantile, lam)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_refused_naming_the_tensor(dtype, factor, where, bad):
    pairs = [lora_pair(i, r=4, n=37, m=29, dtype=dtype) for i in range(3)]  # 148 / 116 values: SIMD tails
    key = f"base_model.model.layers.0.v.{factor}.weight"
    x = pairs[2][0][key].view(-1)
    x[{"first": 0, "middle": x.numel() // 2, "last": -1}[where]] = bad
    with pytest.raises(rk.AdapterError) as info:
        rk.merge(pairs, backend="cpu")
    assert info.value.adapter == "#2" and info.value.tensor == key
    assert "contains 1 NaN/Inf values" in str(info.value)


def test_output_overflow_refused_naming_the_tensor():
    sd, config = lora_pair(0, dtype=torch.float16)
    sd["base_model.model.layers.0.q.lora_B.weight"].fill_(3e4)
    with pytest.raises(rk.AdapterError, match="overflow the output dtype torch.float16") as info:
        rk.merge([(sd, config), (sd, config)], backend="cpu", density=1.0, lam=3.0, dtype="fp16")  # B*: lam * weighted mean
    assert info.value.tensor == "base_model.model.layers.0.q.lora_B.weight"


def test_trained_adapters_cpu_equals_reference_within_tolerance(adapter_dirs):
    ref = rk.merge(adapter_dirs, backend="reference")
    cpu = rk.merge(adapter_dirs, backend="cpu")
    assert cpu.report.backend == "cpu" and ref.keys() == cpu.keys()
    for key in ref:
        assert_close_to_exact(cpu[key], ref[key].double(), ref[key].dtype, float(ref[key].abs().max()), 2.0, key)


def test_auto_picks_cpu_for_cpu_tensors_and_env_overrides(monkeypatch):
    assert rk.get_backend("auto", "cpu").name == "cpu"
    monkeypatch.setenv("ROBUSTMERGE_BACKEND", "reference")
    assert rk.merge([lora_pair(0)]).report.backend == "reference"


def test_thread_count_setting(monkeypatch, threads):
    monkeypatch.setenv("ROBUSTMERGE_NUM_THREADS", "3")
    assert cpu_backend.get_num_threads() == 3
    threads(5)
    assert cpu_backend.get_num_threads() == 5
    with pytest.raises(ValueError, match="positive integer"):
        threads(0)
    threads(None)
    monkeypatch.setenv("ROBUSTMERGE_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match="ROBUSTMERGE_NUM_THREADS"):
        cpu_backend.get_num_threads()


def _tables(**overrides):
    """A valid one-module, one-item plan for the raw binding, with fields overridden."""
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    out_a, out_b = torch.empty(2, 3), torch.empty(4, 2)
    item = dict(a=a.data_ptr(), b=b.data_ptr(), a_dtype=0, b_dtype=0, k_a=4, k_b=6)
    module = dict(rank=2, in_features=3, out_features=4, first=0, members=1, out_a=out_a.data_ptr(),
                  out_b=out_b.data_ptr(), out_dtype=0, clamp_index=1)  # fmt: skip
    for k, v in overrides.items():
        (item if k in item else module)[k] = v
    ext = cpu_backend._load_extension()
    items = torch.tensor([[item[c] for c in ext.ITEM_COLUMNS]], dtype=torch.int64)
    modules = torch.tensor([[module[c] for c in ext.MODULE_COLUMNS]], dtype=torch.int64)
    keep = (a, b, out_a, out_b, items, modules, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32))
    return ext, keep


@pytest.mark.parametrize(
    "override,message",
    [
        ({"a": 0}, "null input pointer"),
        ({"out_b": 0}, "null output pointer"),
        ({"a_dtype": 7}, "input dtype"),
        ({"b_dtype": 3}, "input dtype"),  # float64 is not a kernel input type
        ({"out_dtype": 9}, "unknown output dtype"),
        ({"k_a": 7}, "k of A out of range"),
        ({"k_b": -1}, "k of B out of range"),
        ({"clamp_index": 2}, "clamp index out of range"),
        ({"rank": 0}, "shapes must be positive"),
        ({"members": 2}, "past the end"),
        ({"first": 1}, "contiguous"),
    ],
)
def test_binding_validates_tables(override, message):
    ext, keep = _tables(**override)
    _, _, _, _, items, modules, b_scale, status = keep
    with pytest.raises(ValueError, match=message):
        ext.robustmerge(items.data_ptr(), 1, b_scale.data_ptr(), modules.data_ptr(), 1, 2.0, 1, status.data_ptr())


def test_binding_runs_a_valid_table_and_rejects_bad_counts():
    ext, keep = _tables()
    _, _, out_a, _, items, modules, b_scale, status = keep
    assert ext.robustmerge(items.data_ptr(), 1, b_scale.data_ptr(), modules.data_ptr(), 1, 2.0, 1, status.data_ptr())
    assert torch.equal(out_a, torch.full((2, 3), 2.0))  # all ties kept, lam = 2
    with pytest.raises(ValueError, match="n_threads"):
        ext.robustmerge(items.data_ptr(), 1, b_scale.data_ptr(), modules.data_ptr(), 1, 2.0, 0, status.data_ptr())
    with pytest.raises(ValueError, match="empty plan"):
        ext.robustmerge(items.data_ptr(), 0, b_scale.data_ptr(), modules.data_ptr(), 1, 2.0, 1, status.data_ptr())
