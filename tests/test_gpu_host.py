"""Host-side checks of the GPU paths that need no GPU: the plan tables' fast path against
the per-item path (the CPU backend consumes the same tables), and the host cost of
building them for a llava-7b T = 8 plan (3,584 tensors).
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from _cases import module_inputs

from robustmerge_kernels.backends import tables
from robustmerge_kernels.params import RobustMergeParams

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_group(seed: int, device=None):
    rng = random.Random(seed)
    group = []
    for m in range(rng.randint(1, 6)):
        T, r, n, o = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 40), rng.randint(1, 40)
        a = [torch.randn(r, n).to(rng.choice(DTYPES)) for _ in range(T)]
        b = [torch.randn(o, r).to(rng.choice(DTYPES)) for _ in range(T)]
        scale = [rng.uniform(0.1, 3.0) for _ in range(T)]
        group.append(module_inputs(a, b, scale, out_dtype=rng.choice(DTYPES + [torch.float64]), name=f"m{m}"))
    return group


def same_tables(x: tables.PlanTables, y: tables.PlanTables) -> None:
    """Equal except for the output addresses (each build allocates its own outputs)."""
    out_cols = [tables.MODULE["out_a"], tables.MODULE["out_b"]]
    keep = [c for c in range(len(tables.MODULE_COLUMNS)) if c not in out_cols]
    assert torch.equal(x.items, y.items)
    assert x.items.dtype == y.items.dtype == torch.int64 and x.items.shape == y.items.shape
    assert torch.equal(x.modules[:, keep], y.modules[:, keep])
    assert torch.equal(x.b_scale, y.b_scale) and x.b_scale.dtype == torch.float64
    assert x.members == y.members
    for (xa, xb), (ya, yb) in zip(x.outputs, y.outputs):
        assert (xa.shape, xa.dtype, xb.shape, xb.dtype) == (ya.shape, ya.dtype, yb.shape, yb.dtype)
    for t in (x, y):  # the output columns hold the outputs' addresses
        assert t.modules[:, out_cols].tolist() == [[a.data_ptr(), b.data_ptr()] for a, b in t.outputs]


@pytest.mark.parametrize("seed", range(25))
def test_fast_tables_equal_checked_tables(seed):
    group = random_group(seed)
    params = RobustMergeParams(density=random.Random(seed).uniform(0.0, 1.0))
    fast = tables._fast_tables(group, params, torch.device("cpu"))
    assert fast is not None  # contiguous, planned shapes, kernel dtypes: the fast path applies
    same_tables(fast, tables._checked_tables(group, params, torch.device("cpu")))
    same_tables(tables.build_tables(group, params, torch.device("cpu")), fast)


def test_non_contiguous_input_takes_the_checked_path_with_a_copy():
    group = random_group(3)
    group[0] = g = module_inputs([torch.randn(4, 6) for _ in range(2)], [torch.randn(5, 4) for _ in range(2)])
    x = torch.randn(4, 12)[:, ::2]  # a strided view
    assert not x.is_contiguous()
    g.a[0] = x
    params = RobustMergeParams()
    assert tables._fast_tables(group, params, torch.device("cpu")) is None
    t = tables.build_tables(group, params, torch.device("cpu"))
    copy = t.keep_alive[0]
    assert copy.is_contiguous() and torch.equal(copy, x) and t.items[0, tables.ITEM["a"]] == copy.data_ptr()


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda g: g.a.__setitem__(0, g.a[0].double()), "kernels cannot read torch.float64"),
        (lambda g: g.b.__setitem__(0, g.b[0][:-1]), "differ from the plan"),
        (lambda g: g.a.__setitem__(0, g.a[0].to("meta")), "expected a tensor on cpu"),
    ],
)
def test_bad_inputs_raise_the_checked_paths_errors(spoil, message):
    group = random_group(5)
    spoil(group[-1])
    with pytest.raises(ValueError, match=message):
        tables.build_tables(group, RobustMergeParams(), torch.device("cpu"))


def llava_group(T: int = 8, dtype=torch.bfloat16, device="meta"):
    """The llava-7b plan (224 modules, rank 16) with T adapters on `device` (meta: no memory)."""
    from robustmerge_kernels.demo import synthetic

    group = []
    for prefix, n, m in synthetic.module_list("llava-7b"):
        a = [torch.empty(16, n, dtype=dtype, device=device) for _ in range(T)]
        b = [torch.empty(m, 16, dtype=dtype, device=device) for _ in range(T)]
        group.append(module_inputs(a, b, name=prefix))
    return group


def test_llava_plan_tables_host_cost():
    """The fast path is the one llava-7b takes, and costs much less than the per-item path
    (ratio in the same run: the machine is shared). Absolute figures: benchmarks/host_cost.py."""
    group = llava_group()
    params, device = RobustMergeParams(), torch.device("meta")
    assert len(group) == 224 and tables._fast_tables(group, params, device) is not None

    def cost(build, rounds=7):
        times = []
        for _ in range(rounds):
            t0 = time.process_time()
            build(group, params, device)
            times.append(time.process_time() - t0)
        return sorted(times)[rounds // 2]

    fast, checked = cost(tables.build_tables), cost(tables._checked_tables)
    assert fast < 0.8 * checked, (fast, checked)


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        ("80-real,86-real,90", (7, 5), False),  # T4: `auto` must fall back
        ("80-real,86-real,90", (7, 0), False),  # V100
        ("80-real,86-real,90", (8, 0), True),
        ("80-real,86-real,90", (8, 6), True),
        ("80-real,86-real,90", (8, 9), True),  # sm_86 code runs on 8.9 (same major, higher minor)
        ("80-real,86-real,90", (9, 0), True),
        ("80-real,86-real,90", (10, 0), True),  # compute_90 PTX, compiled by the driver
        ("80-real,86-real,90-real", (10, 0), False),  # no PTX: nothing for Blackwell
        ("90-virtual", (9, 0), True),
        ("90-virtual", (8, 6), False),
        ("86-real", (8, 0), False),  # sm_86 code does not run on a lower minor
        ("native", (9, 0), False),
        ("", (9, 0), False),
    ],
)
def test_cuda_architectures_decide_where_the_module_runs(archs, capability, runs):
    from robustmerge_kernels.backends.cuda import arch_runs_on

    assert arch_runs_on(archs, capability) is runs
