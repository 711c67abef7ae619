"""The Triton backend against the reference, on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported): masks bit-identical (derived from the
kernel's own thresholds), scales and merged factors within dtype tolerance, many modules
and mixed dtypes in one launch, the grid-stride paths, inf/NaN and overflow refused.

The interpreter is slow, so shapes are small; on a machine with a GPU the same tests run
the compiled kernels when TRITON_INTERPRET is unset (tensors are then moved to CUDA).
"""

from __future__ import annotations

# The mode comes from conftest.py (interpreter only where there is no GPU; TRITON_INTERPRET
# set by the caller wins) and is printed in pytest's header: a GPU run compiles the kernels.

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the triton backend is not tested")

from _cases import (  # noqa: E402
    CASES, KERNEL_DTYPES, KERNEL_IDS, assert_close_to_exact, data_scale, kernel_masks, make_case, property_module,
    random_module,
)
from _cases import module_inputs as shared_module_inputs  # noqa: E402
from conftest import lora_pair  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import _oracle  # noqa: E402
import robustmerge_kernels as rk  # noqa: E402
from robustmerge_kernels import backends  # noqa: E402
from robustmerge_kernels.backends import BackendUnavailable, ModuleInputs, NonFiniteInput, OutputOverflow  # noqa: E402
from robustmerge_kernels.backends.triton import backend as tb  # noqa: E402
from robustmerge_kernels.params import RobustMergeParams  # noqa: E402
from robustmerge_kernels.reference import robustmerge_module  # noqa: E402

# numpy, under the interpreter, warns where the kernels divide or cast non-finite values on
# purpose (the inf/NaN and overflow tests); the kernels report those through their status.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]


try:
    BACKEND = tb.TritonBackend()
except BackendUnavailable as exc:  # e.g. TRITON_INTERPRET=0 on a machine without a GPU
    pytest.skip(f"triton backend unavailable: {exc}", allow_module_level=True)
DEVICE = torch.device("cpu") if BACKEND.interpret else torch.device("cuda")


def module_inputs(a, b, b_scale=None, out_dtype=None, name="m"):
    return shared_module_inputs(a, b, b_scale, out_dtype, name, device=DEVICE)


def run_triton(modules, params, details=True):
    det = BACKEND.run(modules, params, details=details)
    det.outputs = [(x.cpu(), y.cpu()) for x, y in det.outputs]
    return det




def check_module(a, b, det_tau_a, det_tau_b, det_scales, out, params, b_scale=None, what="triton"):
    ref = robustmerge_module(a, b, params, b_scale)
    assert torch.equal(kernel_masks(a, det_tau_a), ref.mask_a), f"{what}: mask of A differs from the reference"
    assert torch.equal(kernel_masks(b, det_tau_b), ref.mask_b), f"{what}: mask of B differs from the reference"
    torch.testing.assert_close(torch.stack(det_scales), ref.scales.double(), rtol=1e-12, atol=0.0)
    out_a, out_b = out
    dtype, lam = a[0].dtype, params.lam
    exp = _oracle.robustmerge(a, b, params.density, params.clamp_quantile, lam, b_scale)
    assert_close_to_exact(out_a, exp.a, dtype, data_scale(a, lam), lam, f"{what} A vs oracle")
    assert_close_to_exact(out_b, exp.b, dtype, data_scale(b, lam, b_scale), lam, f"{what} B vs oracle")
    assert_close_to_exact(out_a, ref.a.double(), dtype, data_scale(a, lam), lam, f"{what} A vs reference")
    assert_close_to_exact(out_b, ref.b.double(), dtype, data_scale(b, lam, b_scale), lam, f"{what} B vs reference")


def check_against_reference(a, b, density=0.2, clamp_quantile=0.8, lam=2.0, b_scale=None):
    params = RobustMergeParams(density, clamp_quantile, lam)
    det = run_triton([module_inputs(a, b, b_scale)], params)
    check_module(a, b, det.tau_a, det.tau_b, det.scales, det.outputs[0], params, b_scale)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", CASES)
def test_adversarial_cases_match_reference(case, dtype):
    a, b, kw = make_case(case, dtype)
    if case in ("huge", "huge_mixed"):  # merged values past the dtype's range are refused, not compared
        kw = {**kw, "lam": 1.0 / len(a)}
    check_against_reference(a, b, **kw)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("r,n,m", [(1, 1, 1), (3, 33, 9), (17, 40, 70), (2, 600, 3)])
def test_shapes(r, n, m, dtype):
    a, b = random_module(r * 1000 + n + m, T=3, r=r, n=n, m=m, dtype=dtype)
    check_against_reference(a, b, density=0.25)


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
    """Modules of different ranks, shapes, member counts, input and output dtypes in one group;
    each module's result equals the same module merged alone and the reference."""
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
        mods.append(module_inputs(a, b, bs, od, name=f"m{i}"))
        raw.append((a, b, bs, od))
    det = run_triton(mods, params)
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
        alone = run_triton([mods[i]], params)  # one module alone: the same bits
        assert torch.equal(alone.outputs[0][0], out_a) and torch.equal(alone.outputs[0][1], out_b)
        item += T


@pytest.mark.parametrize("b_scale", [[1.0, 4.0, 0.3], [2.0, 2.0, 2.0]])
def test_b_scale_folded_after_masking(b_scale):
    a, b = random_module(3, T=3, r=4, n=20, m=12, dtype=torch.float32)
    check_against_reference(a, b, b_scale=b_scale)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes_round_like_torch(out_dtype):
    """Stores round to nearest even exactly as torch's .to(dtype) does, subnormals included."""
    a, b = random_module(9, T=4, r=8, n=16, m=12, dtype=torch.float32)
    a[0][0, :8] = torch.tensor([1e-6, 3e-8, 6e-8, 9e-8, 65519.0, 65504.0, 1.0009765625, 2.0**-24 * 1.5])
    a[0][1, :4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, -1.01171875])  # bf16 halfway cases
    params = RobustMergeParams(density=1.0, lam=1.0)
    det = run_triton([module_inputs(a, b, out_dtype=out_dtype)], params)
    ref = robustmerge_module(a, b, params, out_dtype=out_dtype)
    assert torch.equal(det.outputs[0][0], ref.a)


def test_float64_modules_use_the_reference_path():
    a, b = random_module(1, T=2, r=4, n=10, m=6, dtype=torch.float64)
    a32, b32 = random_module(2, T=2, r=4, n=10, m=6, dtype=torch.float32)
    out = BACKEND.robustmerge([module_inputs(a, b), module_inputs(a32, b32)], RobustMergeParams())
    ref = robustmerge_module(a, b, RobustMergeParams())
    assert torch.equal(out[0][0].cpu(), ref.a) and torch.equal(out[0][1].cpu(), ref.b)
    assert out[1][0].dtype == torch.float32


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 5), r=st.integers(1, 12), n=st.integers(1, 40), m=st.integers(1, 40),
    density=st.floats(0.01, 1.0), clamp_quantile=st.floats(0.0, 1.0), lam=st.floats(-3.0, 3.0),
    dtype=st.sampled_from(KERNEL_DTYPES), kind=st.sampled_from(["random", "ties", "sparse"]), seed=st.integers(0, 10**6),
)  # fmt: skip
def test_property_masks_and_outputs_match_reference(T, r, n, m, density, clamp_quantile, lam, dtype, kind, seed):
    check_against_reference(*property_module(T, r, n, m, dtype, kind, seed), density, clamp_quantile, lam)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_detected_naming_member_and_factor(dtype, factor, where, bad):
    mods = [module_inputs(*random_module(i, T=3, r=4, n=13, m=11, dtype=dtype), name=f"m{i}") for i in range(2)]
    x = (mods[1].a if factor == "A" else mods[1].b)[2].view(-1)
    x[0 if where == "first" else -1] = bad
    with pytest.raises(NonFiniteInput) as info:
        BACKEND.run(mods, RobustMergeParams())
    assert info.value.plan.name == "m1" and info.value.member == 2 and info.value.factor == factor


def test_non_finite_detected_when_everything_is_kept():
    """k < 1 needs no threshold, but the inf/NaN check still runs."""
    a, b = random_module(0, T=2, r=2, n=3, m=3, dtype=torch.float32)
    b[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteInput) as info:
        BACKEND.run([module_inputs(a, b)], RobustMergeParams(density=1.0))
    assert info.value.member == 1 and info.value.factor == "B"


@pytest.mark.parametrize("factor", ["A", "B"])
def test_output_overflow_detected(factor):
    a, b = random_module(0, T=2, r=4, n=8, m=6, dtype=torch.float16)
    (a if factor == "A" else b)[0].fill_(3e4)
    (a if factor == "A" else b)[1].fill_(3e4)
    with pytest.raises(OutputOverflow) as info:
        BACKEND.run([module_inputs(a, b)], RobustMergeParams(density=1.0, lam=3.0))
    assert info.value.factor == factor


@pytest.fixture
def triton_serves_cpu(monkeypatch):
    """Register the triton backend for CPU tensors too (interpreter only), so merge() runs it."""
    if not BACKEND.interpret:
        pytest.skip("the API path on CPU tensors needs TRITON_INTERPRET=1")
    entry = backends._REGISTRY["triton"]
    monkeypatch.setitem(backends._REGISTRY, "triton", backends._Entry(entry.factory, ("cpu", "cuda"), entry.priority))


def test_trained_adapters_through_the_api(adapter_dirs, triton_serves_cpu):
    ref = rk.merge(adapter_dirs, backend="reference")
    out = rk.merge(adapter_dirs, backend="triton")
    assert out.report.backend == "triton" and ref.keys() == out.keys()
    for key in ref:
        assert_close_to_exact(out[key], ref[key].double(), ref[key].dtype, float(ref[key].abs().max()), 2.0, key)


def test_api_names_non_finite_tensor_and_overflow(triton_serves_cpu):
    pairs = [lora_pair(i, r=4, n=13, m=11) for i in range(3)]
    key = "base_model.model.layers.0.v.lora_B.weight"
    pairs[2][0][key].view(-1)[5] = float("nan")
    with pytest.raises(rk.AdapterError) as info:
        rk.merge(pairs, backend="triton")
    assert info.value.adapter == "#2" and info.value.tensor == key
    sd, config = lora_pair(0, dtype=torch.float16)
    sd["base_model.model.layers.0.q.lora_B.weight"].fill_(3e4)
    with pytest.raises(rk.AdapterError, match="overflow the output dtype torch.float16"):
        rk.merge([(sd, config), (sd, config)], backend="triton", density=1.0, lam=3.0)


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
