"""Inputs, tolerances and checkers shared by the reference and kernel-backend tests.

Tolerances (Liger-Kernel style) have one explicit row per dtype; the adversarial input
cases (ties, zeros, subnormals, huge values, r = 1, T = 1, T = 64, ...) are built by
``make_case`` so every backend is tested on exactly the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


# --------------------------------------------------------------------------------------
# Tolerances (Liger-Kernel style: one explicit row per dtype).
#
#   |actual - exact| <= atol * scale + rtol * |exact|   (or <= the subnormal floor)
#
# rtol: the reference rounds once from a float32 (float64) accumulator into the output
#   dtype; double rounding can cost one full ulp, plus the accumulator's own error.
# atol: relative to the data's scale (|lam| * max |input|), covers accumulation error
#   under cancellation (sum of T kept values that nearly cancel).
# floor: in units of the dtype's smallest subnormal (times max(1, |lam|)): results in the
#   subnormal range have an absolute, not relative, spacing.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    floor_ulps: float
    scales_rtol: float  # for the A-row scales (computed in float32, float64 for float64)


TOLERANCES = {
    torch.float64: Tol(atol=1e-13, rtol=1e-13, floor_ulps=4, scales_rtol=1e-13),
    torch.float32: Tol(atol=1e-6, rtol=1e-6, floor_ulps=4, scales_rtol=4e-6),
    torch.float16: Tol(atol=1e-5, rtol=2.0**-10, floor_ulps=1, scales_rtol=1e-5),
    torch.bfloat16: Tol(atol=1e-5, rtol=2.0**-7, floor_ulps=1, scales_rtol=1e-5),
}


def smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def data_scale(tensors, lam: float, factors=None) -> float:
    factors = factors or [1.0] * len(tensors)
    return abs(lam) * max(abs(f) * float(t.double().abs().max()) for t, f in zip(tensors, factors))


def assert_close_to_exact(
    actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, scale: float, lam: float = 1.0, what: str = ""
) -> None:
    """``actual`` (in ``dtype``) against the float64 ``exact`` value, with TOLERANCES[dtype]."""
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    assert tuple(actual.shape) == tuple(exact.shape), (what, actual.shape, exact.shape)
    tol = TOLERANCES[dtype]
    exact = exact.to(torch.float64)
    rounded = exact.to(dtype)
    overflow = torch.isinf(rounded)  # the exact value is beyond the dtype's range
    if overflow.any():
        assert torch.equal(actual[overflow], rounded[overflow]), f"{what}: expected inf where the exact value overflows"
    act = actual[~overflow].to(torch.float64)
    exp = exact[~overflow]
    assert torch.isfinite(act).all(), f"{what}: non-finite output where the exact result is finite"
    floor = tol.floor_ulps * smallest_subnormal(dtype) * max(1.0, abs(lam))
    bound = torch.clamp(tol.atol * scale + tol.rtol * exp.abs(), min=floor)
    err = (act - exp).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err / bound))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} elements out of tolerance; worst: "
            f"actual {act[i].item()!r} exact {exp[i].item()!r} err {err[i].item():.3e} bound {bound[i].item():.3e}"
        )


def assert_scales_close(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == exact.shape
    rtol = TOLERANCES[dtype].scales_rtol
    torch.testing.assert_close(actual.to(torch.float64), exact, rtol=rtol, atol=0.0)


def structural_zeros(mask: torch.Tensor) -> torch.Tensor:
    """Entries that no task keeps: the merged value must be exactly zero there."""
    return ~mask.any(dim=0)


def kaiming_a(g, r, n):
    bound = 1.0 / math.sqrt(n)  # PEFT: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(n), 1/sqrt(n))
    return (torch.rand(r, n, generator=g, dtype=torch.float64) * 2 - 1) * bound


def gauss_b(g, m, r, std=0.02):
    return torch.randn(m, r, generator=g, dtype=torch.float64) * std


def random_module(seed, T, r, n, m, dtype):
    g = torch.Generator().manual_seed(seed)
    a = [kaiming_a(g, r, n).to(dtype) for _ in range(T)]
    b = [gauss_b(g, m, r).to(dtype) for _ in range(T)]
    return a, b


def ties_matrix(g, rows, cols, dtype):
    """Values from the tiny set {0, 1, 2, 3} * 0.25 with random signs: almost all ties."""
    v = torch.randint(0, 4, (rows, cols), generator=g).double() * 0.25
    sign = torch.randint(0, 2, (rows, cols), generator=g).double() * 2 - 1
    return (v * sign).to(dtype)


def subnormal_ints(g, shape, dtype):
    """Random integers times the dtype's smallest subnormal (float32 ~1e-41..1e-40, fp16 ~6e-8)."""
    limit = {torch.float32: 1 << 16, torch.bfloat16: 127, torch.float16: 1023, torch.float64: 1 << 20}[dtype]
    ints = torch.randint(-limit, limit + 1, shape, generator=g).double()
    return (ints * smallest_subnormal(dtype)).to(dtype)


HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4, torch.float64: 1e300}


def make_case(name, dtype, seed=0):
    """Returns (a_list, b_list, kwargs for check_module)."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if name == "random":
        a, b = random_module(seed, T=4, r=8, n=24, m=20, dtype=dtype)
    elif name == "T1":
        a, b = random_module(seed, T=1, r=4, n=16, m=12, dtype=dtype)
    elif name == "T64":
        a, b = random_module(seed, T=64, r=4, n=12, m=10, dtype=dtype)
    elif name == "r1":
        a, b = random_module(seed, T=3, r=1, n=17, m=9, dtype=dtype)
    elif name == "odd_shape":
        a, b = random_module(seed, T=3, r=3, n=7, m=5, dtype=dtype)
        kw = dict(density=0.3)
    elif name == "ties":
        a = [ties_matrix(g, 5, 9, dtype) for _ in range(4)]
        b = [ties_matrix(g, 8, 5, dtype) for _ in range(4)]
        kw = dict(density=0.3)
    elif name == "all_zero":
        a = [torch.zeros(4, 6, dtype=dtype) for _ in range(3)]
        b = [torch.zeros(5, 4, dtype=dtype) for _ in range(3)]
    elif name == "one_task_zero":
        a, b = random_module(seed, T=3, r=4, n=10, m=6, dtype=dtype)
        a[1] = torch.zeros_like(a[1])
        b[1] = torch.zeros_like(b[1])
    elif name == "zero_rows_a":
        a, b = random_module(seed, T=3, r=6, n=10, m=6, dtype=dtype)
        a[0][1] = 0
        a[0][4] = 0
        a[2][0] = 0
        # a row that is not zero but loses everything to pruning (kept mass 0 -> s = 1)
        a[1][3] = a[1][3] * 1e-3
    elif name == "equal_rows":
        a, b = [], []
        for _ in range(3):
            c = torch.rand(4, 1, generator=g, dtype=torch.float64) + 0.1
            sign = torch.randint(0, 2, (4, 8), generator=g).double() * 2 - 1
            a.append((c * sign).to(dtype))  # every row: one magnitude
            b.append(torch.full((6, 4), 0.03, dtype=torch.float64).mul(torch.tensor([1.0, -1.0, 2.0, 0.5])).to(dtype))
    elif name == "denormal":
        a = [subnormal_ints(g, (4, 9), dtype) for _ in range(3)]
        b = [subnormal_ints(g, (7, 4), dtype) for _ in range(3)]
    elif name == "huge":
        h = HUGE[dtype]
        a = [((torch.rand(4, 9, generator=g, dtype=torch.float64) * 2 - 1) * h).to(dtype) for _ in range(3)]
        b = [((torch.rand(7, 4, generator=g, dtype=torch.float64) * 2 - 1) * h).to(dtype) for _ in range(3)]
    elif name == "huge_mixed":  # huge values next to ordinary ones
        a, b = random_module(seed, T=3, r=4, n=9, m=7, dtype=dtype)
        h = HUGE[dtype]
        a[0][0, :3] = h
        a[2][3, 5] = -h
        b[1][2, 1] = h
    elif name == "negative_zero":
        a, b = random_module(seed, T=3, r=4, n=10, m=8, dtype=dtype)
        for x in (*a, *b):
            sel = torch.rand(x.shape, generator=g) < 0.5
            neg = torch.rand(x.shape, generator=g) < 0.5
            x[sel & neg] = -0.0
            x[sel & ~neg] = 0.0
        a[1] = -torch.zeros_like(a[1])  # a whole matrix of -0.0
    elif name == "mostly_zero":  # > (1 - density) zeros: tau = 0, everything kept
        a, b = random_module(seed, T=2, r=4, n=10, m=8, dtype=dtype)
        for x in (*a, *b):
            x[torch.rand(x.shape, generator=g) < 0.9] = 0.0
    elif name == "keep_all":
        a, b = random_module(seed, T=3, r=4, n=6, m=5, dtype=dtype)
        kw = dict(density=1.0)
    elif name == "k_below_1":  # density < 1 but int(N * (1 - density)) == 0
        a, b = random_module(seed, T=2, r=2, n=3, m=3, dtype=dtype)
        kw = dict(density=0.9)
    elif name == "k_N_minus_1":  # N = 24 for A and B; tau = 2nd largest: keeps the top 2 (and ties)
        a, b = random_module(seed, T=3, r=4, n=6, m=6, dtype=dtype)
        kw = dict(density=0.5 / 24)
    elif name == "clamp_q0":
        a, b = random_module(seed, T=3, r=6, n=8, m=5, dtype=dtype)
        kw = dict(clamp_quantile=0.0)
    elif name == "clamp_q1":
        a, b = random_module(seed, T=3, r=6, n=8, m=5, dtype=dtype)
        kw = dict(clamp_quantile=1.0)
    elif name == "odd_lam":
        a, b = random_module(seed, T=3, r=4, n=8, m=5, dtype=dtype)
        kw = dict(lam=-0.7, density=0.37, clamp_quantile=0.33)
    else:
        raise KeyError(name)
    return a, b, kw


CASES = [
    "random", "T1", "T64", "r1", "odd_shape", "ties", "all_zero", "one_task_zero", "zero_rows_a",
    "equal_rows", "denormal", "huge", "huge_mixed", "negative_zero", "mostly_zero", "keep_all",
    "k_below_1", "k_N_minus_1", "clamp_q0", "clamp_q1", "odd_lam",
]  # fmt: skip


# --------------------------------------------------------------------------------------
# Shared by the kernel-backend suites (cpu, triton, cuda)
# --------------------------------------------------------------------------------------
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_IDS = ["fp32", "fp16", "bf16"]


def module_inputs(a, b, b_scale=None, out_dtype=None, name="m", device=None):
    """One module's inputs as a backend receives them (a plan with members 0..T-1)."""
    from robustmerge_kernels.backends import ModuleInputs
    from robustmerge_kernels.plan import ModulePlan

    r, n = a[0].shape
    plan = ModulePlan(
        name=name, a_key=f"{name}.lora_A.weight", b_key=f"{name}.lora_B.weight", rank=r, in_features=n,
        out_features=b[0].shape[0], members=tuple(range(len(a))), a_keys=("a",) * len(a), b_keys=("b",) * len(a),
        b_scale=tuple(b_scale or [1.0] * len(a)), out_dtype=out_dtype or a[0].dtype, nbytes_in=0,
    )  # fmt: skip
    return ModuleInputs(plan, [x.to(device) if device else x for x in a], [x.to(device) if device else x for x in b])


def kernel_masks(xs, taus):
    """Masks a kernel used: |x| >= tau with tau as the kernel returned it (input dtype)."""
    return torch.stack([x.abs() >= tau for x, tau in zip(xs, taus)])


def property_module(T, r, n, m, dtype, kind, seed):
    """Inputs for the hypothesis tests: random, heavy ties, or mostly zeros."""
    a, b = random_module(seed, T=T, r=r, n=n, m=m, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        a = [(x * 8).round() / 8 for x in a]
        b = [(x * 200).round() / 200 for x in b]
    elif kind == "sparse":
        a = [x * (torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.3) for x in a]
        b = [x * (torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.3) for x in b]
    return [x.to(dtype) for x in a], [x.to(dtype) for x in b]
