"""Host-side checks of the GPU paths that need no GPU: the plan tables' fast path against
the per-item path (the CPU backend consumes the same tables), and the host cost of
building them for a llava-7b T = 8 plan (3,584 tensors).
"""

from __future__ import annotations

import random
import sys

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


def python_calls(fn) -> int:
    """Python-level function calls fn makes (C calls not counted): deterministic, unlike time."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_llava_plan_tables_take_the_whole_group_path():
    """llava-7b T = 8 (3,584 tensors) takes the fast path, whose Python work grows with the
    modules (224), not the tensors: the per-tensor checks run in C (map over accessors).
    Its time is measured by benchmarks/host_cost.py (a timing assert would be flaky here)."""
    group = llava_group()
    params, device = RobustMergeParams(), torch.device("meta")
    n_tensors = sum(len(g.a) + len(g.b) for g in group)
    assert n_tensors == 3584 and tables._fast_tables(group, params, device) is not None
    fast = python_calls(lambda: tables.build_tables(group, params, device))
    checked = python_calls(lambda: tables._checked_tables(group, params, device))
    assert fast < n_tensors / 4 < checked, (fast, checked)
