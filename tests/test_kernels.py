"""The kernel suite, once for every kernel backend (``backend`` fixture: cpu, triton, cuda;
see tests/_backends.py): each backend against the reference and the independent oracle,
masks bit-identical (derived from the kernel's own thresholds), A-row scales and merged
factors within the per-dtype tolerances of _cases.py; shapes; many modules with mixed
dtypes and ranks in one call; inf/NaN inputs and overflowing outputs refused naming the
member and factor (and, through merge(), the adapter and tensor); float64 routed to the
reference; a hypothesis property test; identity with the cpu backend.

Backend-specific tests (thread counts, interpreter/compiled mode and grid-stride paths,
host-side table validation, streams) stay in test_{cpu,triton,cuda}_backend.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _backends import BACKENDS, check_against_reference, check_many_modules
from _cases import (
    CASES,
    KERNEL_DTYPES,
    KERNEL_IDS,
    TOLERANCES,
    assert_close_to_exact,
    make_case,
    property_module,
    random_module,
)
from conftest import lora_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels.backends import NonFiniteInput, OutputOverflow
from robustmerge_kernels.backends.cpu import CpuBackend
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.reference import robustmerge_module

# numpy, under the Triton interpreter, warns where the kernels divide or cast non-finite
# values on purpose (the inf/NaN and overflow tests); the kernels report those via status.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]


@pytest.mark.interpreter_slow(unless=lambda p: p["case"] != "T64")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", CASES)
def test_adversarial_cases_match_reference(backend, case, dtype):
    a, b, kw = make_case(case, dtype)
    if case in ("huge", "huge_mixed"):  # merged values past the dtype's range are refused, not compared
        kw = {**kw, "lam": 1.0 / len(a)}
    check_against_reference(backend, a, b, **kw)


# (r, n, m) per backend: the interpreter is slow, so Triton gets a few small shapes; the
# cpu grid covers SIMD tails (n = 33) and A*/B* spanning several fusion blocks (> 8192
# values); the cuda grid partial warps and tiles, rows longer than a tile (n = 4097) and
# llava-7b MLP shapes larger than shared memory (r 16 x 11008: 704 KB in fp32).
_GRID = [(r, n, m) for r in (1, 2, 3, 16, 17) for n, m in ((1, 1), (7, 5), (16, 64), (33, 9), (600, 3), (40, 1100))]
SHAPES = {
    "cpu": _GRID,
    "triton": [(1, 1, 1), (3, 33, 9), (17, 40, 70), (2, 600, 3)],
    "cuda": [(r, n, m) for r in (1, 3, 16, 17, 64) for n, m in ((1, 1), (33, 9), (600, 3), (40, 1100), (4097, 5))]
    + [(16, 11008, 4096)],
}
# The cuda grid again with the split selection forced on every matrix (one slice for the
# small ones, up to 9 for 64 x 4097 and 6 for 16 x 11008): bit-identical by construction.
SHAPES["cuda-split"] = SHAPES["cuda"]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize(
    "backend,shape",
    [pytest.param(b, s, id=f"{b}-r{s[0]}-n{s[1]}-m{s[2]}") for b in [*BACKENDS, "cuda-split"] for s in SHAPES[b]],
    indirect=["backend"],
)
def test_shape_grid(backend, shape, dtype):
    r, n, m = shape
    a, b = random_module(r * 1000 + n + m, T=3 if n < 10000 else 2, r=r, n=n, m=m, dtype=dtype)
    check_against_reference(backend, a, b, density=0.25 if n < 10000 else 0.2)


@pytest.mark.parametrize("b_scale", [[1.0, 4.0, 0.3], [2.0, 2.0, 2.0]])
def test_b_scale_folded_after_masking(backend, b_scale):
    a, b = random_module(3, T=3, r=4, n=20, m=12, dtype=torch.float32)
    check_against_reference(backend, a, b, b_scale=b_scale)


def test_mixed_input_dtypes_in_one_module(backend):
    a, b = random_module(5, T=3, r=4, n=20, m=12, dtype=torch.float64)
    a = [a[0].float(), a[1].bfloat16(), a[2].half()]
    b = [b[0].half(), b[1].float(), b[2].bfloat16()]
    check_against_reference(backend, a, b, out_dtype=torch.float32)


@pytest.mark.interpreter_slow  # test_triton_backend.py runs it fast with small blocks
def test_many_modules_mixed_dtypes_and_ranks_in_one_call(backend):
    """Modules of different ranks, shapes, member counts, input and output dtypes in one
    group; each module's result equals the reference and the same module merged alone."""
    check_many_modules(backend)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes_round_like_torch(backend, out_dtype):
    """Stores round to nearest even exactly as torch's .to(dtype) does, subnormals included."""
    a, b = random_module(9, T=4, r=8, n=64, m=48, dtype=torch.float32)
    a[0][0, :8] = torch.tensor([1e-6, 3e-8, 6e-8, 9e-8, 65519.0, 65504.0, 1.0009765625, 2.0**-24 * 1.5])
    a[0][1, :4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, -1.01171875])  # bf16 halfway cases
    params = RobustMergeParams(density=1.0, lam=1.0)
    det = backend.run([backend.inputs(a, b, out_dtype=out_dtype)], params)
    ref = robustmerge_module(a, b, params, out_dtype=out_dtype)
    assert torch.equal(det.outputs[0][0], ref.a)
    torch.testing.assert_close(det.outputs[0][1], ref.b, rtol=TOLERANCES[out_dtype].rtol, atol=1e-7)


def test_float64_modules_use_the_reference_path(backend):
    a, b = random_module(1, T=2, r=4, n=10, m=6, dtype=torch.float64)
    a32, b32 = random_module(2, T=2, r=4, n=10, m=6, dtype=torch.float32)
    out = backend.impl.robustmerge([backend.inputs(a, b), backend.inputs(a32, b32)], RobustMergeParams())
    ref = robustmerge_module(a, b, RobustMergeParams())
    assert torch.equal(out[0][0].cpu(), ref.a) and torch.equal(out[0][1].cpu(), ref.b)
    assert out[1][0].dtype == torch.float32 and out[1][0].device.type == backend.device.type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_clamp_quantile_makes_weights_depend_on_the_column(backend, dtype):
    """At the default quantile 0.8 and small ranks every A row is clamped to the largest
    scale, so fusion weights are the same for all rows and a row/column mix-up in B's
    fusion would go unseen; rank 16 at quantile 0.25 keeps most rows distinct."""
    a, b = random_module(21, T=3, r=16, n=40, m=33, dtype=dtype)
    check_against_reference(backend, a, b, clamp_quantile=0.25)


@pytest.mark.parametrize("with_float64", [False, True])
def test_kernel_calls_per_group(backend, monkeypatch, with_float64):
    """A group of kernel types is one kernel call (no per-tensor dtype pre-check); a float64
    module makes the tables refuse before any kernel runs, and the rest goes in a second call."""
    calls = []
    run_kernel = backend.impl._run_kernel

    def counted(group, params, details):
        calls.append(len(group))
        return run_kernel(group, params, details)

    monkeypatch.setattr(backend.impl, "_run_kernel", counted)
    a, b = random_module(1, T=2, r=4, n=10, m=6, dtype=torch.float64 if with_float64 else torch.bfloat16)
    a32, b32 = random_module(2, T=2, r=4, n=10, m=6, dtype=torch.float32)
    group = [backend.inputs(a32, b32), backend.inputs(a, b), backend.inputs(a32, b32)]
    det = backend.impl.run(group, RobustMergeParams(), details=True)
    assert calls == ([3, 2] if with_float64 else [3])
    assert len(det.tau_a) == (4 if with_float64 else 6)  # thresholds of the kernel modules' items
    for pos, (x, y) in ((1, (a, b)), (0, (a32, b32))):
        ref = robustmerge_module(x, y, RobustMergeParams())
        tol = TOLERANCES[ref.a.dtype]
        torch.testing.assert_close(det.outputs[pos][0].cpu(), ref.a, rtol=tol.rtol, atol=tol.atol)


# Examples per backend: Triton's interpreter takes ~0.1-1 s per example.
def _property_examples(backend) -> int:
    return 25 if backend.interpreted else 120


@pytest.mark.interpreter_slow
def test_property_masks_and_outputs_match_reference(backend):
    @settings(max_examples=_property_examples(backend), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(
        T=st.integers(1, 6), r=st.integers(1, 20), n=st.integers(1, 70), m=st.integers(1, 70),
        density=st.floats(0.01, 1.0), clamp_quantile=st.floats(0.0, 1.0), lam=st.floats(-3.0, 3.0),
        dtype=st.sampled_from(KERNEL_DTYPES), kind=st.sampled_from(["random", "ties", "sparse"]),
        seed=st.integers(0, 10**6),
    )  # fmt: skip
    def prop(T, r, n, m, density, clamp_quantile, lam, dtype, kind, seed):
        if backend.interpreted:  # keep interpreter examples small
            r, n, m = min(r, 12), min(n, 40), min(m, 40)
        a, b = property_module(T, r, n, m, dtype, kind, seed)
        check_against_reference(backend, a, b, density, clamp_quantile, lam)

    prop()


# --------------------------------------------------------------------------------------
# inf/NaN inputs, overflowing outputs
# --------------------------------------------------------------------------------------
MODULES = ("q", "v")


@pytest.mark.interpreter_slow(unless=lambda p: p["where"] == "middle" and math.isnan(p["bad"]))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_refused_naming_member_factor_and_tensor(backend, dtype, factor, where, bad):
    """One bad value in adapter 2's v factor: the backend names module, member and factor;
    merge() names the adapter and the tensor. 148 / 116 values: SIMD tails."""
    pairs = [lora_pair(i, r=4, n=37, m=29, dtype=dtype, modules=MODULES) for i in range(3)]
    key = f"base_model.model.layers.0.v.lora_{factor}.weight"
    x = pairs[2][0][key].view(-1)
    x[{"first": 0, "middle": x.numel() // 2, "last": -1}[where]] = bad
    mods = []
    for name in MODULES:
        prefix = f"base_model.model.layers.0.{name}"
        a = [sd[f"{prefix}.lora_A.weight"] for sd, _ in pairs]
        b = [sd[f"{prefix}.lora_B.weight"] for sd, _ in pairs]
        mods.append(backend.inputs(a, b, name=name))
    with pytest.raises(NonFiniteInput) as info:
        backend.impl.run(mods, RobustMergeParams())
    assert info.value.plan.name == "v" and info.value.member == 2 and info.value.factor == factor
    with pytest.raises(rk.AdapterError) as info:
        rk.merge(backend.pairs(pairs), backend=backend.name)
    assert info.value.adapter == "#2" and info.value.tensor == key
    assert "contains 1 NaN/Inf values" in str(info.value)


def test_non_finite_detected_when_everything_is_kept(backend):
    """k < 1 needs no threshold, but the inf/NaN check still runs."""
    a, b = random_module(0, T=2, r=2, n=3, m=3, dtype=torch.float32)
    b[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteInput) as info:
        backend.impl.run([backend.inputs(a, b)], RobustMergeParams(density=1.0))
    assert info.value.member == 1 and info.value.factor == "B"


@pytest.mark.parametrize("factor", ["A", "B"])
def test_output_overflow_detected_per_factor(backend, factor):
    a, b = random_module(0, T=2, r=4, n=8, m=6, dtype=torch.float16)
    (a if factor == "A" else b)[0].fill_(3e4)
    (a if factor == "A" else b)[1].fill_(3e4)
    with pytest.raises(OutputOverflow) as info:
        backend.impl.run([backend.inputs(a, b)], RobustMergeParams(density=1.0, lam=3.0))
    assert info.value.factor == factor


def test_output_overflow_refused_through_merge_naming_the_tensor(backend):
    sd, config = lora_pair(0, dtype=torch.float16)
    sd["base_model.model.layers.0.q.lora_B.weight"].fill_(3e4)
    with pytest.raises(rk.AdapterError, match="overflow the output dtype torch.float16") as info:
        # B*: lam * weighted mean of 3e4 overflows fp16
        rk.merge(backend.pairs([(sd, config), (sd, config)]), backend=backend.name, density=1.0, lam=3.0, dtype="fp16")
    assert info.value.tensor == "base_model.model.layers.0.q.lora_B.weight"


# --------------------------------------------------------------------------------------
# Through the API, and against the cpu backend
# --------------------------------------------------------------------------------------
def _load_pairs(dirs):
    out = []
    for d in dirs:
        with open(os.path.join(d, "adapter_config.json")) as f:
            config = json.load(f)
        out.append((load_file(os.path.join(d, "adapter_model.safetensors")), config))
    return out


@pytest.mark.interpreter_slow
def test_trained_adapters_through_the_api(backend, adapter_dirs):
    ref = rk.merge(adapter_dirs, backend="reference")
    out = rk.merge(backend.pairs(_load_pairs(adapter_dirs)), backend=backend.name)
    assert out.report.backend == backend.name and ref.keys() == out.keys()
    for key in ref:
        got = out[key].cpu()
        assert_close_to_exact(got, ref[key].double(), ref[key].dtype, float(ref[key].abs().max()), 2.0, key)


def _many_modules(backend, count, T, dtype, seed=0):
    mods = []
    for i in range(count):
        a, b = random_module(seed + i, T=T, r=8, n=48 + i, m=40 + 3 * i, dtype=dtype)
        mods.append(backend.inputs(a, b, name=f"m{i}"))
    return mods


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
def test_same_thresholds_and_a_bits_as_the_cpu_backend_and_deterministic(backend, dtype):
    """Same thresholds and the same float32 order of operations as the CPU kernel: A* is
    bit-identical to it (B* depends on the double row sums, summed in another order), and
    every backend is bit-identical run to run."""
    params = RobustMergeParams()
    # 12 modules: more than 2x the cpu threads (module-per-task schedule); fewer in the interpreter
    mods = (
        _many_modules(backend, 3, T=3, dtype=dtype)
        if backend.interpreted
        else _many_modules(backend, 12, T=5, dtype=dtype)
    )
    first, second = backend.run(mods, params), backend.run(mods, params)
    cpu_mods = [type(m)(m.plan, [x.cpu() for x in m.a], [x.cpu() for x in m.b]) for m in mods]
    cpu = CpuBackend().run(cpu_mods, params, details=True)
    for (a0, b0), (a1, b1), (ac, bc) in zip(first.outputs, second.outputs, cpu.outputs):
        assert torch.equal(a0, a1) and torch.equal(b0, b1), "not bit-identical run to run"
        assert torch.equal(a0.view(torch.uint8), ac.view(torch.uint8)), "A* differs from the cpu backend"
        torch.testing.assert_close(b0, bc, rtol=TOLERANCES[dtype].rtol, atol=1e-7)
    for t0, tc in zip(first.tau_a + first.tau_b, cpu.tau_a + cpu.tau_b):
        assert torch.equal(t0, tc), "threshold differs from the cpu backend"
    for s0, s1, sc in zip(first.scales, second.scales, cpu.scales):
        assert torch.equal(s0, s1)
        torch.testing.assert_close(s0, sc, rtol=1e-12, atol=0.0)
