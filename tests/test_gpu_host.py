"""Host-side checks of the GPU paths that need no GPU: the plan tables' fast paths (the
DLPack exchange path and the attribute path) against the per-item path (the CPU backend
consumes the same tables), what makes the exchange path step aside, and the host cost of
building them for a llava-7b T = 8 plan (3,584 tensors).
"""

from __future__ import annotations

import ctypes
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


HAS_EXCHANGE = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")  # torch >= 2.10


@pytest.fixture(params=["exchange", "attributes"])
def fast_path(request, monkeypatch):
    """Which fast path _fast_tables takes: the binding reading tensors through torch's DLPack
    C exchange API, or Python mapping attribute accessors (torch without that API)."""
    if request.param == "exchange":
        if not HAS_EXCHANGE:
            pytest.skip(f"torch {torch.__version__} has no DLPack C exchange API")
        assert tables._exchange() is not None, "torch has the API: the _cpu extension must be able to use it"
    else:
        monkeypatch.setattr(tables, "_exchange", lambda: None)
    return request.param


@pytest.mark.parametrize("seed", range(25))
def test_fast_tables_equal_checked_tables(seed, fast_path):
    group = random_group(seed)
    params = RobustMergeParams(density=random.Random(seed).uniform(0.0, 1.0))
    fast = tables._fast_tables(group, params, torch.device("cpu"))
    assert fast is not None  # contiguous, planned shapes, kernel dtypes: the fast path applies
    same_tables(fast, tables._checked_tables(group, params, torch.device("cpu")))
    same_tables(tables.build_tables(group, params, torch.device("cpu")), fast)


def test_non_contiguous_input_takes_the_checked_path_with_a_copy(fast_path):
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
def test_bad_inputs_raise_the_checked_paths_errors(spoil, message, fast_path):
    group = random_group(5)
    spoil(group[-1])
    with pytest.raises(ValueError, match=message):
        tables.build_tables(group, RobustMergeParams(), torch.device("cpu"))


def llava_group(T: int = 8, dtype=torch.bfloat16, device="meta"):
    """The llava-7b plan (224 modules, rank 16) with T adapters on `device` (meta: no memory;
    cpu: contiguous views of one small buffer, which the tables never read)."""
    from robustmerge_kernels.demo import synthetic

    shapes = synthetic.module_list("llava-7b")
    base = torch.empty(16 * max(max(n, m) for _, n, m in shapes), dtype=dtype, device=device)
    group = []
    for prefix, n, m in shapes:
        a = [base[: 16 * n].view(16, n) for _ in range(T)]
        b = [base[: 16 * m].view(m, 16) for _ in range(T)]
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


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_llava_plan_tables_take_the_whole_group_path(device, fast_path):
    """llava-7b T = 8 (3,584 tensors) takes a fast path, whose Python work grows with the
    modules (224), not the tensors: the per-tensor checks run in C (the binding through the
    DLPack exchange API, or map over accessors; meta tensors always take the latter).
    Its time is measured by benchmarks/host_cost.py (a timing assert would be flaky here)."""
    group = llava_group(device=device)
    params, dev = RobustMergeParams(), torch.device(device)
    n_tensors = sum(len(g.a) + len(g.b) for g in group)
    assert n_tensors == 3584 and tables._fast_tables(group, params, dev) is not None
    fast = python_calls(lambda: tables.build_tables(group, params, dev))
    checked = python_calls(lambda: tables._checked_tables(group, params, dev))
    assert fast < n_tensors / 4 < checked, (fast, checked)


# ---- the DLPack exchange path: what it takes, what it leaves to the checked path

needs_exchange = pytest.mark.skipif(not HAS_EXCHANGE, reason="torch without the DLPack C exchange API")


class _Sub(torch.Tensor):
    pass


def _exchange_only(group, params=None, device="cpu"):
    """_fast_tables on the exchange path; the exchange path must be the one available."""
    assert tables._exchange() is not None
    return tables._fast_tables(group, params or RobustMergeParams(), torch.device(device))


@needs_exchange
@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda x: x.as_subclass(_Sub), id="tensor-subclass"),
        pytest.param(lambda x: x.t().contiguous().t(), id="transposed"),
        pytest.param(lambda x: torch.randn(x.shape[0], 2 * x.shape[1])[:, ::2], id="strided"),
        pytest.param(lambda x: x.double(), id="float64-input"),
        pytest.param(lambda x: x.to(torch.int16), id="int16"),
        pytest.param(lambda x: x.reshape(-1), id="one-dimensional"),
        pytest.param(lambda x: x.unsqueeze(0), id="three-dimensional"),
        pytest.param(lambda x: x[:, :-1].contiguous(), id="wrong-shape"),
        pytest.param(lambda x: x.to("meta"), id="other-device"),
    ],
)
@pytest.mark.parametrize("which", ["a", "b"])
def test_exchange_path_leaves_what_it_cannot_take_to_the_checked_path(spoil, which):
    group = random_group(11)
    g = group[len(group) // 2] = module_inputs(
        [torch.randn(4, 6) for _ in range(3)], [torch.randn(5, 4) for _ in range(3)]
    )
    getattr(g, which)[-1] = spoil(getattr(g, which)[-1])
    assert _exchange_only(group) is None


@needs_exchange
def test_exchange_path_takes_parameters_offset_views_and_size_one_strides():
    """Accepted as torch accepts them: Parameters needing grad, views into a larger storage
    (the address is the view's, not the storage's), size-1 dimensions whatever their stride."""
    params = RobustMergeParams()
    storage = torch.randn(1000)
    a0 = storage[100:160].view(4, 15)  # storage offset 100
    a1 = torch.nn.Parameter(torch.randn(4, 15))
    b_row = torch.randn(9, 1).t()  # shape (1, 9), strides (1, 1): contiguous by torch's rule
    assert b_row.is_contiguous() and b_row.stride() == (1, 1)
    g1 = module_inputs([a0, a1], [torch.randn(7, 4), torch.randn(7, 4)], name="m0")
    g2 = module_inputs([torch.randn(9, 3)], [b_row.reshape(1, 9).t().t()], name="m1")  # B (1, 9): rank 9
    group = [g1, g2]
    t = _exchange_only(group, params)
    assert t is not None
    assert t.items[:, tables.ITEM["a"]].tolist() == [a0.data_ptr(), a1.data_ptr(), g2.a[0].data_ptr()]
    assert a0.data_ptr() == storage.data_ptr() + 100 * 4
    same_tables(t, tables._checked_tables(group, params, torch.device("cpu")))


def _fill(group, outs_a=None, outs_b=None, n_items=None, capsule=None, codes=None):
    """ext.fill_tables on fresh tables for `group` -> (result, modules, items, b_scale)."""
    ext, api, types = tables._exchange()
    plans = [g.plan for g in group]
    outs_a = outs_a if outs_a is not None else [torch.empty(p.rank, p.in_features, dtype=p.out_dtype) for p in plans]
    outs_b = outs_b if outs_b is not None else [torch.empty(p.out_features, p.rank, dtype=p.out_dtype) for p in plans]
    W = sum(len(p.members) for p in plans) if n_items is None else n_items
    modules = torch.zeros(len(group), len(tables.MODULE_COLUMNS), dtype=torch.int64)
    items, b_scale = torch.zeros(W, len(tables.ITEM_COLUMNS), dtype=torch.int64), torch.zeros(W, dtype=torch.float64)
    result = ext.fill_tables(
        group, outs_a, outs_b, modules.data_ptr(), len(group), items.data_ptr(), W, b_scale.data_ptr(), 0.2, 0.8,
        codes if codes is not None else tables.OUT_DTYPES, 1, 0, capsule if capsule is not None else api, types,
    )  # fmt: skip
    return result, modules, items, b_scale


@needs_exchange
def test_fill_tables_refuses_arguments_that_do_not_match():
    group = random_group(2)
    assert _fill(group)[0] == -1
    with pytest.raises(ValueError, match="one entry per module"):
        _fill(group, outs_a=[])
    with pytest.raises(ValueError, match="fewer items than n_items"):
        _fill(group, n_items=sum(len(g.a) for g in group) + 1)
    with pytest.raises(ValueError, match="PyCapsule_GetPointer"):
        _fill(group, capsule=object())
    with pytest.raises(ValueError, match="out_dtype without a code"):
        _fill(group, codes={})


@needs_exchange
def test_fill_tables_positions_of_what_it_does_not_take():
    """-1, or the flat position (A inputs, then B inputs, then outputs) of the first tensor
    the fast path leaves to the checked path."""
    group = random_group(4)
    W = sum(len(g.a) for g in group)
    first_of = [sum(len(g.a) for g in group[:m]) for m in range(len(group))]
    last = len(group) - 1
    group[last].a.pop()  # the last module's A list shorter than its members: its first A position
    assert _fill(group, n_items=W)[0] == first_of[last]
    group = random_group(4)
    group[last].b[0] = torch.randn(group[last].plan.out_features + 1, group[last].plan.rank)  # not the planned shape
    assert _fill(group)[0] == W + first_of[last]
    group = random_group(4)
    wrong = [torch.empty(g.plan.out_features, g.plan.rank, dtype=torch.int32) for g in group]  # no output dtype
    assert _fill(group, outs_b=wrong)[0] == 2 * W + 1  # the first module's B output


@needs_exchange
@pytest.mark.parametrize("density", [1e-12, 0.05, 0.1, 0.2, 1 / 3, 0.5, 0.7, 0.9, 1 - 1e-12, 1.0])
@pytest.mark.parametrize("clamp_quantile", [0.0, 0.1, 0.8, 0.999, 1.0])
def test_exchange_k_and_clamp_index_match_python_arithmetic(density, clamp_quantile):
    """The binding computes k and the clamp index itself; they must equal prune_count and
    the checked path's min(int(rank * q), rank - 1) exactly."""
    shapes = [(1, 1, 1), (3, 7, 5), (16, 4096, 11008), (7, 333, 1), (64, 999, 1001), (5, 10, 10)]
    group = [
        module_inputs([torch.randn(r, n)], [torch.randn(m, r)], name=f"m{i}") for i, (r, n, m) in enumerate(shapes)
    ]
    params = RobustMergeParams(density=density, clamp_quantile=clamp_quantile)
    fast = _exchange_only(group, params)
    assert fast is not None
    same_tables(fast, tables._checked_tables(group, params, torch.device("cpu")))


def test_no_exchange_api_means_the_attribute_path(monkeypatch):
    monkeypatch.delattr(torch.Tensor, "__dlpack_c_exchange_api__", raising=False)
    tables._exchange.cache_clear()
    try:
        assert tables._exchange() is None
        group = random_group(7)
        same_tables(tables.build_tables(group, RobustMergeParams(), torch.device("cpu")),
                    tables._checked_tables(group, RobustMergeParams(), torch.device("cpu")))  # fmt: skip
    finally:
        monkeypatch.undo()
        tables._exchange.cache_clear()


@needs_exchange
def test_exchange_api_is_dropped_when_its_reads_differ_from_torch(monkeypatch):
    """The one-time self-check: a binding that read other addresses than torch reports
    (an exchange API laid out differently) leaves the attribute path in charge."""
    ext, capsule, types = tables._exchange()

    class Shifted:  # the binding, reading every address 16 bytes off
        def __getattr__(self, name):
            return getattr(ext, name)

        def fill_tables(self, group, out_a, out_b, modules, n_modules, items, *rest):
            failed = ext.fill_tables(group, out_a, out_b, modules, n_modules, items, *rest)
            row = torch.frombuffer((ctypes.c_int64 * 6).from_address(items), dtype=torch.int64)
            row[0] += 16
            return failed

    assert tables._exchange_reads_like_torch((ext, capsule, types))
    assert not tables._exchange_reads_like_torch((Shifted(), capsule, types))


@needs_exchange
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("seed", range(5))
def test_exchange_path_reads_cuda_tensors(seed):
    """On a GPU: CUDA tensors are read as kDLCUDA on their device, the tables equal the
    checked path's, and one CPU tensor in a CUDA group sends it to the checked path."""
    device = torch.device("cuda", torch.cuda.current_device())
    assert tables._dlpack_device(device) == ((10 if torch.version.hip else 2), device.index)
    group = random_group(seed)
    for g in group:
        g.a[:], g.b[:] = [x.to(device) for x in g.a], [x.to(device) for x in g.b]
    params = RobustMergeParams()
    fast = _exchange_only(group, params, device)
    assert fast is not None and all(o.device == device for pair in fast.outputs for o in pair)
    same_tables(fast, tables._checked_tables(group, params, device))
    group[0].b[0] = group[0].b[0].cpu()
    assert _exchange_only(group, params, device) is None


# ---- state-dict headers through the exchange API (adapter_io/sources.py)


def _python_headers(values):
    return [x.dtype for x in values], [tuple(x.shape) for x in values], {x.device for x in values}


@needs_exchange
def test_read_headers_gives_what_torch_reports():
    assert tables._headers_usable()
    storage = torch.randn(100)
    values = [torch.randn(3, 4), torch.nn.Parameter(torch.randn(5)), torch.empty(()), torch.empty(0, 7),
              storage[10:40].view(5, 6).t(), torch.zeros(2, 2, dtype=torch.bool), torch.ones(4, dtype=torch.int64),
              torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.complex64)]  # fmt: skip
    read = tables.read_headers(values)
    assert read is not None and read == _python_headers(values)
    assert all(type(s) is tuple for s in read[1])  # plain tuples (untracked by the GC), not torch.Size


@needs_exchange
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.zeros(2, 3).to_sparse(), id="sparse-coo"),
        pytest.param(lambda: torch.zeros(2, 3).to_sparse_csr(), id="sparse-csr"),
        pytest.param(lambda: torch.zeros(2, 3).to_mkldnn(), id="mkldnn"),
        pytest.param(lambda: torch.zeros(2, 3, device="meta"), id="meta"),
        pytest.param(lambda: torch.zeros(3, dtype=torch.float8_e4m3fn), id="float8-unmapped"),
        pytest.param(lambda: torch.zeros(3).as_subclass(_Sub), id="subclass"),
        pytest.param(lambda: "not a tensor", id="not-a-tensor"),
    ],
)
def test_read_headers_leaves_the_unusual_to_python(make):
    """Whatever the Python checks refuse or treat specially is never taken by the C pass."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd = make()
    assert tables.read_headers([torch.zeros(2), odd]) is None


def test_state_dict_headers_equal_with_and_without_the_exchange(monkeypatch):
    from robustmerge_kernels.adapter_io.sources import _from_state_dict

    sd = {"a.lora_A.weight": torch.randn(4, 6), "a.lora_B.weight": torch.nn.Parameter(torch.randn(5, 4)),
          "x.bias": torch.zeros(5, dtype=torch.bfloat16)}  # fmt: skip
    fast = _from_state_dict(sd, None, "adapter 0")
    monkeypatch.setattr(tables, "read_headers", lambda values: None)
    slow = _from_state_dict(sd, None, "adapter 0")
    assert (fast._shapes, fast._dtypes, fast.device) == (slow._shapes, slow._dtypes, slow.device)
    assert fast._shapes == {k: tuple(v.shape) for k, v in sd.items()}
