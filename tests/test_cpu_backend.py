"""What only the CPU C++ backend has: results independent of the thread count and
schedule, exact with FTZ/DAZ set, the thread-count setting, the raw binding's validation
of its plan tables. The shared kernel suite (every backend against the reference) is
tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
from _cases import KERNEL_DTYPES, KERNEL_IDS, kernel_masks, module_inputs, random_module, subnormal_ints
from conftest import lora_pair

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
