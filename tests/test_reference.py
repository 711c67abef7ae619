"""Correctness of the plain-PyTorch reference (robustmerge_kernels.reference) against an
independent float64 transcription of docs/ALGORITHM.md §3 (tests/_oracle.py).

What is checked, for every input:
  * masks of A and B are bit-identical to the oracle's (thresholds are exact values of the
    input dtype, ties at tau are kept);
  * the clamped A-row scales are close to the oracle's float64 ones;
  * merged A/B are within a per-dtype tolerance (table below) of the float64 oracle, and of
    the reference's own float64 evaluation of the same inputs (same masks);
  * where the exact result overflows the output dtype, the output is the inf that
    rounding produces, and nowhere else is it non-finite.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import robustmerge_kernels
from robustmerge_kernels import reference
from robustmerge_kernels.dtypes import default_factor_dtype
from robustmerge_kernels.params import RobustMergeParams

try:  # tests/ may or may not be a package, depending on what else lives there
    from . import _oracle
except ImportError:
    import _oracle

from _cases import (  # noqa: E402
    CASES,
    DTYPE_IDS,
    DTYPES,
    TOLERANCES,
    assert_close_to_exact,
    assert_scales_close,
    data_scale,
    gauss_b,
    kaiming_a,
    make_case,
    random_module,
    structural_zeros,
    subnormal_ints,
    ties_matrix,
)


# --------------------------------------------------------------------------------------
# The one comparison every input goes through.
# --------------------------------------------------------------------------------------
def check_module(a_list, b_list, density=0.2, clamp_quantile=0.8, lam=2.0, b_scale=None):
    dtype = a_list[0].dtype
    params = RobustMergeParams(density, clamp_quantile, lam)
    res = reference.robustmerge_module(a_list, b_list, params, b_scale)
    exp = _oracle.robustmerge(a_list, b_list, density, clamp_quantile, lam, b_scale)

    # 1. masks: bit-identical
    assert res.mask_a.dtype == torch.bool and res.mask_b.dtype == torch.bool
    assert torch.equal(res.mask_a, exp.mask_a), "mask_a differs from the oracle"
    assert torch.equal(res.mask_b, exp.mask_b), "mask_b differs from the oracle"
    # 2. scales
    assert_scales_close(res.scales, exp.scales, dtype)
    # 3. merged factors against the float64 oracle
    scale_a = data_scale(a_list, lam)
    scale_b = data_scale(b_list, lam, b_scale)
    assert_close_to_exact(res.a, exp.a, dtype, scale_a, lam, "merged A vs oracle")
    assert_close_to_exact(res.b, exp.b, dtype, scale_b, lam, "merged B vs oracle")
    za, zb = structural_zeros(exp.mask_a), structural_zeros(exp.mask_b)
    assert (res.a[za] == 0).all() and (res.b[zb] == 0).all(), "pruned-everywhere entries must be exactly 0"
    # 4. the reference's own float64 evaluation of the same inputs: same masks, and the
    #    result in the input dtype is within tolerance of it
    res64 = reference.robustmerge_module([x.double() for x in a_list], [x.double() for x in b_list], params, b_scale)
    assert torch.equal(res64.mask_a, res.mask_a) and torch.equal(res64.mask_b, res.mask_b)
    assert_close_to_exact(res.a, res64.a, dtype, scale_a, lam, "merged A vs float64 evaluation")
    assert_close_to_exact(res.b, res64.b, dtype, scale_b, lam, "merged B vs float64 evaluation")
    return res, exp


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_oracle(case, dtype):
    a, b, kw = make_case(case, dtype)
    res, exp = check_module(a, b, **kw)
    T, r, n = exp.mask_a.shape
    exp.mask_b.shape[1]
    # Case-specific facts, so that each adversarial case really exercises what it claims.
    if case in ("keep_all", "k_below_1", "all_zero", "mostly_zero"):
        assert exp.mask_a.all() and exp.mask_b.all()
    if case == "k_N_minus_1":
        kept = exp.mask_a.reshape(T, -1).sum(1)
        assert _oracle.prune_k(r * n, 0.5 / 24) == r * n - 1
        assert (kept == 2).all()  # tau is the (N-1)-th smallest = the 2nd largest
    if case == "ties":  # ties at tau are kept: more than density * N entries survive
        k = int(r * n * (1 - 0.3))
        assert (exp.mask_a.reshape(T, -1).sum(1) > r * n - k).any()
    if case == "zero_rows_a":
        assert exp.scales[0, 1] >= 1 and exp.scales[0, 4] >= 1
        assert not exp.mask_a[1, 3].any()  # the shrunken row lost all its mass
    if case == "clamp_q1":  # every scale raised to the task's maximum
        assert torch.equal(res.scales, res.scales.max(dim=1, keepdim=True).values.expand_as(res.scales))
    if case in ("all_zero",):
        assert (res.a == 0).all() and (res.b == 0).all() and (res.scales == 1).all()
    if case == "negative_zero":
        assert torch.isfinite(res.a).all() and torch.isfinite(res.b).all()  # no NaN from 0/-0 rows
        assert torch.isfinite(res.scales).all()
    if case == "huge" and dtype == torch.float16:
        # 2 * (sum of three 6e4-scale values) exceeds fp16's range: the reference returns the
        # rounded value, inf (the output dtype defaults to the input dtype). See the report.
        assert torch.isinf(res.a).any()


def test_mixed_input_dtypes():
    """Adapters stored in different dtypes: each task's mask on its own stored values, output in the first's dtype."""
    a, b = random_module(3, T=3, r=4, n=9, m=6, dtype=torch.float32)
    a[0], b[0] = a[0].half(), b[0].half()
    a[2], b[2] = a[2].bfloat16(), b[2].bfloat16()
    params = RobustMergeParams()
    res = reference.robustmerge_module(a, b, params)
    exp = _oracle.robustmerge(a, b, 0.2, 0.8, 2.0)
    assert torch.equal(res.mask_a, exp.mask_a) and torch.equal(res.mask_b, exp.mask_b)
    assert_close_to_exact(res.a, exp.a, torch.float16, data_scale(a, 2.0), what="A")
    assert_close_to_exact(res.b, exp.b, torch.float16, data_scale(b, 2.0), what="B")


# --------------------------------------------------------------------------------------
# A worked example, computed by hand from docs/ALGORITHM.md §3 (independent of both codes).
# --------------------------------------------------------------------------------------
WORKED_A = [[[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]], [[2.0, 2.0, -1.0], [1.0, 1.0, 1.0]]]
WORKED_B = [[[1.0, -3.0], [2.0, 0.25]], [[4.0, 1.0], [-1.0, 1.0]]]
# density 0.5 -> k = 3 (A, N=6), k = 2 (B, N=4); clamp_quantile 0.5 -> lo = sorted(s)[1]; lam 2
#   A_1: tau = 1 -> mask [[1,1,1],[0,0,1]]; s = [6/6, 4.5/4] = [1, 1.125] -> clamp -> [1.125, 1.125]
#   A_2: tau = 1 (tie, all kept); s = [1, 1]
#   B_1: tau = 1 -> mask [[1,1],[1,0]];  B_2: tau = 1, all kept
WORKED_MASK_A = [[[True, True, True], [False, False, True]], [[True] * 3, [True] * 3]]
WORKED_MASK_B = [[[True, True], [True, False]], [[True, True], [True, True]]]
WORKED_SCALES = [[1.125, 1.125], [1.0, 1.0]]
WORKED_OUT_A = [[6.0, 0.0, 4.0], [2.0, 2.0, -6.0]]
WORKED_OUT_B = [[82 / 17, -38 / 17], [20 / 17, 16 / 17]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_worked_example(dtype):
    a = [torch.tensor(x, dtype=dtype) for x in WORKED_A]
    b = [torch.tensor(x, dtype=dtype) for x in WORKED_B]
    exact_a = torch.tensor(WORKED_OUT_A, dtype=torch.float64)
    exact_b = torch.tensor(WORKED_OUT_B, dtype=torch.float64)
    for impl in ("reference", "oracle"):
        if impl == "reference":
            res = reference.robustmerge_module(a, b, RobustMergeParams(0.5, 0.5, 2.0))
        else:
            res = _oracle.robustmerge(a, b, 0.5, 0.5, 2.0)
        assert res.mask_a.tolist() == WORKED_MASK_A, impl
        assert res.mask_b.tolist() == WORKED_MASK_B, impl
        assert res.scales.double().tolist() == WORKED_SCALES, impl
        got_a = res.a if impl == "reference" else res.a.to(dtype)
        got_b = res.b if impl == "reference" else res.b.to(dtype)
        assert_close_to_exact(got_a, exact_a, dtype, 8.0, what=f"{impl} A")
        assert_close_to_exact(got_b, exact_b, dtype, 8.0, what=f"{impl} B")


# --------------------------------------------------------------------------------------
# The checkers themselves must reject wrong answers (so the tests above can fail).
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_checker_rejects_small_errors(dtype):
    a, b = random_module(11, T=3, r=4, n=12, m=8, dtype=dtype)
    exp = _oracle.robustmerge(a, b, 0.2, 0.8, 2.0)
    good = exp.b.to(dtype)
    scale = data_scale(b, 2.0)
    assert_close_to_exact(good, exp.b, dtype, scale)  # correctly rounded oracle passes
    i = int(exp.b.abs().argmax())
    tol = TOLERANCES[dtype]
    for rel in (4 * tol.rtol, -4 * tol.rtol):
        bad = exp.b.clone().reshape(-1)
        bad[i] = bad[i] * (1 + rel) + math.copysign(4 * tol.atol * scale, rel)
        with pytest.raises(AssertionError):
            assert_close_to_exact(bad.reshape(exp.b.shape).to(dtype), exp.b, dtype, scale)
    # a spurious inf / nan is rejected
    bad = good.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(AssertionError):
        assert_close_to_exact(bad, exp.b, dtype, scale)
    # one flipped mask bit is detected
    res = reference.robustmerge_module(a, b, RobustMergeParams())
    flipped = res.mask_a.clone()
    flipped[1, 2, 3] = ~flipped[1, 2, 3]
    assert torch.equal(res.mask_a, exp.mask_a) and not torch.equal(flipped, exp.mask_a)


# --------------------------------------------------------------------------------------
# "At least as close to float64 as the official code's own arithmetic" (docs/ALGORITHM.md §3, Numerics).
# The official code does the arithmetic with torch ops in the adapters' dtype.
# --------------------------------------------------------------------------------------
def official_arithmetic(a_list, b_list, density, cq, lam, mask_a, mask_b):
    a = torch.stack(a_list)
    b = torch.stack(b_list)
    ka, kb = a * mask_a, b * mask_b
    s = a.abs().sum(dim=2) / ka.abs().sum(dim=2)
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    r = a.shape[1]
    lo = s.sort(dim=1).values[:, min(int(r * cq), r - 1)]
    s = torch.maximum(s, lo[:, None])
    merged_a = lam * ka.sum(dim=0)
    merged_b = lam * (kb * s[:, None, :]).sum(dim=0) / s.sum(dim=0)
    return merged_a, merged_b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_at_least_as_accurate_as_input_dtype_arithmetic(dtype):
    a, b = random_module(5, T=16, r=8, n=64, m=48, dtype=dtype)
    res, exp = check_module(a, b)
    off_a, off_b = official_arithmetic(a, b, 0.2, 0.8, 2.0, exp.mask_a, exp.mask_b)
    for mine, theirs, exact in ((res.a, off_a, exp.a), (res.b, off_b, exp.b)):
        err_mine = (mine.double() - exact).abs().sum()
        err_theirs = (theirs.double() - exact).abs().sum()
        assert err_mine <= err_theirs, (float(err_mine), float(err_theirs))


# --------------------------------------------------------------------------------------
# b_scale: the ratio that brings an adapter to the output scaling, folded into B.
# The reference masks B on its *stored* values and multiplies the kept values by b_scale:
# magnitude pruning is scale-invariant (|c*x| >= c*tau iff |x| >= tau for c > 0), so this is
# docs/ALGORITHM.md §3 (Scaling: fold into B before step 1) without the rounding a scaled copy would introduce.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_b_scale_is_applied_after_masking_unscaled_b(dtype):
    a, b = random_module(21, T=3, r=6, n=14, m=10, dtype=dtype)
    b_scale = [0.5, 3.0, 1.7]
    params = RobustMergeParams()
    res = reference.robustmerge_module(a, b, params, b_scale)
    plain = reference.robustmerge_module(a, b, params)
    # masks of the unscaled B, then the formula on B scaled (in float64) with those masks
    masks_b = [_oracle.magnitude_mask(x, 0.2) for x in b]
    prescaled = [x.double() * s for x, s in zip(b, b_scale)]
    exp = _oracle.robustmerge(a, prescaled, 0.2, 0.8, 2.0, masks_b=masks_b)
    assert torch.equal(res.mask_b, plain.mask_b) and torch.equal(res.mask_b, exp.mask_b)
    assert torch.equal(res.mask_a, exp.mask_a)
    assert torch.equal(res.a, plain.a) and torch.equal(res.scales, plain.scales)  # A untouched by b_scale
    assert_close_to_exact(res.b, exp.b, dtype, data_scale(b, 2.0, b_scale), what="B with b_scale")
    # and it is not the unscaled result
    assert not torch.allclose(res.b.double(), plain.b.double())
    # the oracle's own b_scale argument agrees with the explicit construction
    exp2 = _oracle.robustmerge(a, b, 0.2, 0.8, 2.0, b_scale)
    torch.testing.assert_close(exp2.b, exp.b, rtol=1e-14, atol=0)


def test_b_scale_power_of_two_equals_prescaled_storage():
    """Scaling by a power of two is exact, so b_scale must give bit-for-bit the result on pre-scaled B."""
    a, b = random_module(22, T=3, r=4, n=10, m=8, dtype=torch.float32)
    b_scale = [2.0, 0.5, 4.0]
    params = RobustMergeParams()
    res = reference.robustmerge_module(a, b, params, b_scale)
    pre = reference.robustmerge_module(a, [x * s for x, s in zip(b, b_scale)], params)
    assert torch.equal(res.mask_b, pre.mask_b)
    assert torch.equal(res.b, pre.b)


def test_b_scale_masks_stored_values_not_rounded_scaled_copy():
    """fp16 B whose scaled, re-rounded copy would have a tie at tau: the mask is the stored values'."""
    base = torch.tensor([[1.0, 1.0 + 2**-10], [0.25, 2.0], [0.5, 0.0625]], dtype=torch.float16)
    b = [base, base.clone()]
    a = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float16)] * 2
    scale = 2.0**-20
    scaled_copy = base * scale  # lands in fp16's subnormals: the two largest entries collide (16 * 2**-24)
    assert scaled_copy[0, 0] == scaled_copy[0, 1]
    density = 1 / 6 * 0.9  # N = 6: k = 5, tau = the 2nd largest: keeps 2.0 and 1 + 2**-10 (and ties)
    assert _oracle.prune_k(6, density) == 5
    res = reference.robustmerge_module(a, b, RobustMergeParams(density, 0.8, 2.0), [scale, 1.0])
    stored = _oracle.magnitude_mask(base, density)
    rounded = _oracle.magnitude_mask(scaled_copy, density)
    assert stored != rounded  # the test discriminates
    assert sum(map(sum, stored)) == 2 and sum(map(sum, rounded)) == 3
    assert res.mask_b[0].tolist() == stored


# --------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    T=st.integers(1, 6),
    r=st.integers(1, 6),
    n=st.integers(1, 10),
    m=st.integers(1, 10),
    density=st.one_of(st.floats(1e-3, 1.0), st.sampled_from([1.0, 0.5, 0.2, 0.05])),
    clamp_quantile=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.8, 1.0])),
    lam=st.sampled_from([2.0, 1.0, 0.5, -1.5, 3.3]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["kaiming", "ties", "sparse", "subnormal", "wide_range"]),
    seed=st.integers(0, 2**31 - 1),
    use_b_scale=st.booleans(),
)
def test_property_reference_matches_oracle(T, r, n, m, density, clamp_quantile, lam, dtype, kind, seed, use_b_scale):
    g = torch.Generator().manual_seed(seed)

    def draw(rows, cols, is_a):
        if kind == "kaiming":
            return (kaiming_a(g, rows, cols) if is_a else gauss_b(g, rows, cols)).to(dtype)
        if kind == "ties":
            return ties_matrix(g, rows, cols, dtype)
        if kind == "sparse":
            x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
            x[torch.rand(rows, cols, generator=g) < 0.6] = 0.0
            return x.to(dtype)
        if kind == "subnormal":
            return subnormal_ints(g, (rows, cols), dtype)
        # wide_range: magnitudes spread over many binades (well inside the dtype's range)
        span = 10 if dtype == torch.float16 else 30
        e = torch.randint(-span, span, (rows, cols), generator=g).double()
        return (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2.0**e).to(dtype)

    a = [draw(r, n, True) for _ in range(T)]
    b = [draw(m, r, False) for _ in range(T)]
    b_scale = None
    if use_b_scale:
        rnd = random.Random(seed)
        b_scale = [rnd.choice([0.5, 1.0, 2.0, 1.3, 0.77]) for _ in range(T)]
    check_module(a, b, density, clamp_quantile, lam, b_scale)


# --------------------------------------------------------------------------------------
# Really trained adapters (peft on a tiny Llama), end to end through merge()
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import get_peft_model_state_dict

    from robustmerge_kernels.demo import toy

    base = toy.tiny_llama()
    adapters = []
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and immune to a busy machine
    try:
        # the third adapter has twice the alpha, so merge() must fold a b_scale of 2 into its B
        for task, alpha in ((0, 8), (1, 8), (2, 16)):
            model = toy.train_adapter(base, task, steps=6, lora_alpha=alpha)
            sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            adapters.append((sd, model.peft_config["default"]))
    finally:
        torch.set_num_threads(prev)
    return adapters


def lora_modules(sd):
    """{module name: (A key, B key)} paired by name (never by order)."""
    out = {}
    for key in sd:
        for f in ("A", "B"):
            tag = f".lora_{f}.weight"
            if key.endswith(tag):
                out.setdefault(key[: -len(tag)], {})[f] = key
    return {mod: (d["A"], d["B"]) for mod, d in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_trained_adapters_end_to_end(trained, dtype):
    adapters = [({k: v.to(dtype) for k, v in sd.items()}, cfg) for sd, cfg in trained]
    sds = [sd for sd, _ in adapters]
    # sanity: training happened and the adapters differ
    for sd in sds:
        assert all(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    mods = lora_modules(sds[0])
    assert len(mods) == 14 and all(lora_modules(sd) == mods for sd in sds)
    first_key = next(iter(mods.values()))[0]
    assert not torch.equal(sds[0][first_key], sds[1][first_key])

    merged = robustmerge_kernels.merge(adapters, backend="reference")
    assert merged.report.backend == "reference"
    assert set(merged) == {k for pair in mods.values() for k in pair}
    # the output config keeps the first adapter's scaling (alpha 8, r 4): the third's ratio is 2
    scalings = [cfg.lora_alpha / cfg.r for _, cfg in adapters]
    b_scale = [s / scalings[0] for s in scalings]
    assert b_scale == [1.0, 1.0, 2.0]
    assert merged.config["lora_alpha"] == 8 and merged.config["r"] == 4

    for mod, (ka, kb) in mods.items():
        a = [sd[ka] for sd in sds]
        b = [sd[kb] for sd in sds]
        exp = _oracle.robustmerge(a, b, 0.2, 0.8, 2.0, b_scale)
        # exact masks (merge() does not return them; the reference on the same inputs does)
        # fp16/bf16 inputs: float32 factors by default (the official code's output dtype)
        out_dtype = default_factor_dtype(dtype)
        res = reference.robustmerge_module(a, b, RobustMergeParams(), b_scale, out_dtype)
        assert torch.equal(res.mask_a, exp.mask_a), mod
        assert torch.equal(res.mask_b, exp.mask_b), mod
        assert_scales_close(res.scales, exp.scales, dtype)
        assert torch.equal(merged[ka], res.a) and torch.equal(merged[kb], res.b), mod
        assert_close_to_exact(merged[ka], exp.a, out_dtype, data_scale(a, 2.0), what=f"{mod} A")
        assert_close_to_exact(merged[kb], exp.b, out_dtype, data_scale(b, 2.0, b_scale), what=f"{mod} B")


def test_trained_adapters_pair_by_name_not_order(trained):
    """Reversing one adapter's key order (B before A, modules reversed) changes nothing."""
    shuffled = [(dict(reversed(list(sd.items()))) if i == 1 else sd, cfg) for i, (sd, cfg) in enumerate(trained)]
    m1 = robustmerge_kernels.merge(list(trained), backend="reference")
    m2 = robustmerge_kernels.merge(shuffled, backend="reference")
    assert set(m1) == set(m2)
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


# --------------------------------------------------------------------------------------
# Public API with plain state dicts: determinism and non-LoRA averaging
# --------------------------------------------------------------------------------------
PREFIX = "base_model.model.model."


def synthetic_state_dicts(T=3, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sds = []
    for t in range(T):
        sd = {}
        for layer in range(2):
            for proj, (n, m) in (("q_proj", (32, 32)), ("down_proj", (48, 32))):
                mod = (
                    f"{PREFIX}layers.{layer}.mlp.{proj}"
                    if proj == "down_proj"
                    else f"{PREFIX}layers.{layer}.self_attn.{proj}"
                )
                sd[f"{mod}.lora_A.weight"] = kaiming_a(g, 8, n).to(dtype)
                sd[f"{mod}.lora_B.weight"] = gauss_b(g, m, 8).to(dtype)
        sd[f"{PREFIX}mm_projector.0.weight"] = torch.randn(16, 12, generator=g, dtype=torch.float64).to(dtype)
        sd[f"{PREFIX}mm_projector.0.bias"] = torch.randn(16, generator=g, dtype=torch.float64).half()
        if t != 1:  # carried by only some adapters: averaged over those that carry it
            sd["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(
                10, 32, generator=g, dtype=torch.float64
            ).to(dtype)
        sds.append(sd)
    return sds


def bits(x: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return x.contiguous().view(view)


def assert_bit_identical(m1, m2):
    assert list(m1) == list(m2)
    for k in m1:
        assert m1[k].dtype == m2[k].dtype, k
        assert torch.equal(bits(m1[k]), bits(m2[k])), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_api_deterministic(dtype):
    sds = synthetic_state_dicts(dtype=dtype)
    m1 = robustmerge_kernels.merge(sds, backend="reference")
    m2 = robustmerge_kernels.merge(synthetic_state_dicts(dtype=dtype), backend="reference")
    assert_bit_identical(m1, m2)
    # and independent of the number of threads
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m3 = robustmerge_kernels.merge(sds, backend="reference")
    finally:
        torch.set_num_threads(prev)
    assert_bit_identical(m1, m3)


def test_reference_thread_count_invariant_large_rows():
    """Rows long enough that a reduction could be split across threads: still bit-identical."""
    g = torch.Generator().manual_seed(3)
    a = [torch.rand(2, 1 << 18, generator=g) - 0.5 for _ in range(2)]
    b = [torch.randn(1 << 12, 2, generator=g) for _ in range(2)]
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = reference.robustmerge_module(a, b, RobustMergeParams())
        torch.set_num_threads(max(2, prev))
        r2 = reference.robustmerge_module(a, b, RobustMergeParams())
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(bits(r1.a), bits(r2.a)) and torch.equal(bits(r1.b), bits(r2.b))
    assert torch.equal(r1.scales, r2.scales)


def test_api_non_lora_tensors_are_averaged_and_lora_merged():
    sds = synthetic_state_dicts()
    merged = robustmerge_kernels.merge(sds, backend="reference")
    assert merged.report.averaged_tensors == 3
    # non-LoRA: element-wise mean over the adapters that carry the tensor, in its dtype
    for key in (
        f"{PREFIX}mm_projector.0.weight",
        f"{PREFIX}mm_projector.0.bias",
        "base_model.model.lm_head.modules_to_save.default.weight",
    ):
        carriers = [sd[key] for sd in sds if key in sd]
        assert len(carriers) == (2 if "modules_to_save" in key else 3)
        expected = _oracle.mean(carriers)
        assert_close_to_exact(merged[key], expected, carriers[0].dtype, float(expected.abs().max()) + 1, what=key)
        # it is the mean, not e.g. the first adapter's copy or the sum
        assert not torch.equal(merged[key], carriers[0])
    # LoRA factors: the oracle per module (no config -> b_scale 1)
    mods = lora_modules(sds[0])
    assert len(mods) == 4
    for _mod, (ka, kb) in mods.items():
        a = [sd[ka] for sd in sds]
        b = [sd[kb] for sd in sds]
        exp = _oracle.robustmerge(a, b, 0.2, 0.8, 2.0)
        assert_close_to_exact(merged[ka], exp.a, torch.float32, data_scale(a, 2.0), what=ka)
        assert_close_to_exact(merged[kb], exp.b, torch.float32, data_scale(b, 2.0), what=kb)
        assert torch.equal(merged[ka] == 0, structural_zeros(exp.mask_a))


def test_api_hyperparameters_are_passed_through():
    sds = synthetic_state_dicts(T=2, seed=9)
    merged = robustmerge_kernels.merge(sds, density=0.45, clamp_quantile=0.3, lam=0.9, backend="reference")
    assert merged.report.hyperparameters == {"density": 0.45, "clamp_quantile": 0.3, "lam": 0.9}
    for _mod, (ka, kb) in lora_modules(sds[0]).items():
        a = [sd[ka] for sd in sds]
        b = [sd[kb] for sd in sds]
        exp = _oracle.robustmerge(a, b, 0.45, 0.3, 0.9)
        assert_close_to_exact(merged[ka], exp.a, torch.float32, data_scale(a, 0.9), what=ka)
        assert_close_to_exact(merged[kb], exp.b, torch.float32, data_scale(b, 0.9), what=kb)


# --------------------------------------------------------------------------------------
# Finite inputs near the float32 / bfloat16 maximum: row sums (step 2) and the non-LoRA
# sum (step 5) must not overflow when the exact results are finite (they once did: the
# merged B became NaN and the mean inf, silently).
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_near_max_values_do_not_produce_nan(dtype):
    a = [torch.tensor([[3e38, 3e38]], dtype=dtype)]  # finite; exact s = 1
    b = [torch.tensor([[1.0], [2.0]], dtype=dtype)]
    exp = _oracle.robustmerge(a, b, 1.0, 0.8, 0.5)
    assert exp.scales.tolist() == [[1.0]] and exp.b.tolist() == [[0.5], [1.0]]
    res = reference.robustmerge_module(a, b, RobustMergeParams(density=1.0, lam=0.5))
    assert torch.isfinite(res.scales).all()
    assert_close_to_exact(res.b, exp.b, dtype, 1.0, what="B")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mean_of_near_max_values_is_finite(dtype):
    x = [torch.tensor([3e38], dtype=dtype)] * 2
    got = reference.mean_tensors(x)
    assert_close_to_exact(got, _oracle.mean(x), dtype, 3e38, what="mean")
