"""The split selection of the CUDA backend (csrc/robustmerge/cuda/select.cuh): matrices of
more than ``split_elems`` keys are selected by several blocks per pass.

Runs everywhere the extension is built (no GPU): the launch plan and the workspace the
binding derives from the host tables (which matrices split, into how many blocks, the grid
of each selection launch, the scratch), the default threshold against llava-7b shapes, and
the RMK_CUDA_SPLIT_ELEMS parsing. Needs a CUDA device (skipped otherwise): split forced,
split at an intermediate threshold and never split give bit-identical thresholds, masks,
scales, outputs and inf/NaN reports, equal to the CPU backend's and the reference's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _backends import BackendUnderTest, check_against_reference  # noqa: E402
from _cases import KERNEL_DTYPES, KERNEL_IDS, kernel_masks, module_inputs, random_module  # noqa: E402
from test_cuda_backend import FAKE, _raw, needs_extension, needs_gpu  # noqa: E402

from robustmerge_kernels.backends import NonFiniteInput  # noqa: E402
from robustmerge_kernels.backends import tables as plan_tables  # noqa: E402
from robustmerge_kernels.backends.cpu import CpuBackend  # noqa: E402
from robustmerge_kernels.backends.cuda import SPLIT_ENV, split_elems  # noqa: E402
from robustmerge_kernels.params import RobustMergeParams  # noqa: E402

NEVER = 1 << 62
BF16 = plan_tables.KERNEL_DTYPES[torch.bfloat16]


def _ext():
    from robustmerge_kernels import _cuda

    return _cuda


def _align(n: int) -> int:  # launch.cuh's Layout: every array starts on a 256-byte boundary
    return (n + 255) // 256 * 256


# --------------------------------------------------------------------------------------
# RMK_CUDA_SPLIT_ELEMS (no extension needed)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,expected",
    [
        (None, 1234),
        ("", 1234),
        ("  ", 1234),
        ("0", 0),
        (" 4096 ", 4096),
        ("1_000", 1000),
        (str(1 << 70), (1 << 63) - 1),
    ],
)
def test_split_env_parsing(raw, expected):
    env = {} if raw is None else {SPLIT_ENV: raw}
    assert split_elems(1234, env) == expected


@pytest.mark.parametrize("raw", ["-1", "lots", "1e6", "0x10"])
def test_split_env_rejects_bad_values_naming_the_variable(raw):
    with pytest.raises(ValueError, match=f"{SPLIT_ENV} must be an integer >= 0.*{raw!r}"):
        split_elems(1234, {SPLIT_ENV: raw})


def test_split_env_is_read_from_the_process_environment(monkeypatch):
    monkeypatch.setenv(SPLIT_ENV, "77")
    assert split_elems(5) == 77
    monkeypatch.delenv(SPLIT_ENV)
    assert split_elems(5) == 5


def test_backend_rejects_a_negative_threshold_before_anything_else():
    from robustmerge_kernels.backends.cuda import CudaBackend

    with pytest.raises(ValueError, match="split_elems must be >= 0"):
        CudaBackend(split_elems=-1)


# --------------------------------------------------------------------------------------
# The launch plan and the workspace (host arithmetic in the binding)
# --------------------------------------------------------------------------------------
def _vocab_plan(dtype_a=0, dtype_b=0):
    """lm_head (rank 16, 4096 -> 32000: B 512,000 keys) and embed_tokens (32000 -> 4096: A
    512,000 keys) LoRAs, 2 + 1 adapters; matrix = 2 * item + (1 for B)."""
    shapes = {"rank": 16}
    it, md, bs = _raw(
        items={i: {"a_dtype": dtype_a, "b_dtype": dtype_b} for i in range(3)},
        modules={0: dict(shapes, in_features=4096, out_features=32000), 1: dict(shapes, in_features=32000, out_features=4096)},
    )  # fmt: skip
    return it, md, bs


def _sizes(md):
    """Keys of every matrix (2 * item + is_b), from the module rows."""
    cols = plan_tables.MODULE
    sizes = []
    for row in md.tolist():
        r = row[cols["rank"]]
        sizes += [r * row[cols["in_features"]], row[cols["out_features"]] * r] * row[cols["members"]]
    return sizes


def _plan(ext, it, md, bs, split):
    return ext.select_plan(it.data_ptr(), it.shape[0], bs.data_ptr(), md.data_ptr(), md.shape[0], split)


@needs_extension
@pytest.mark.parametrize("split", [0, 1, 65535, 65536, 262144, 511999, 512000, NEVER])
@pytest.mark.parametrize("wide", [True, False], ids=["fp32", "bf16"])
def test_select_plan_splits_exactly_the_matrices_above_the_threshold(split, wide):
    ext = _ext()
    it, md, bs = _vocab_plan(*((0, 0) if wide else (BF16, BF16)))
    plan = _plan(ext, it, md, bs, split)
    sizes = _sizes(md)
    expected = [mat for mat, n in enumerate(sizes) if n > split]
    assert plan["split_matrices"] == expected
    assert plan["split_blocks"] == [math.ceil(sizes[mat] / ext.SPLIT_SLICE) for mat in expected]
    blocks = sum(plan["split_blocks"])
    passes = (3 if wide else 2) if expected else 1  # launch 0 always runs (the one-block path)
    assert plan["grids"] == [2 * 3 + blocks] + [blocks] * (passes - 1)
    assert plan["workspace_bytes"] == ext.workspace_size(it.data_ptr(), 3, bs.data_ptr(), md.data_ptr(), 2, split)


@needs_extension
def test_select_plan_third_launch_only_for_float32_split_matrices():
    ext = _ext()
    it, md, bs = _vocab_plan(BF16, BF16)
    it[2, plan_tables.ITEM["a_dtype"]] = 0  # item 2's A (an embed_tokens A: split by default) is float32
    assert len(_plan(ext, it, md, bs, ext.DEFAULT_SPLIT_ELEMS)["grids"]) == 3
    it[2, plan_tables.ITEM["a_dtype"]] = BF16
    it[0, plan_tables.ITEM["a_dtype"]] = 0  # a float32 A of 65,536 keys: not split by default
    assert len(_plan(ext, it, md, bs, ext.DEFAULT_SPLIT_ELEMS)["grids"]) == 2


@needs_extension
@pytest.mark.parametrize("split", [0, 262144])
def test_workspace_holds_the_split_scratch(split):
    """Per split matrix: a 2,048-bin uint32 histogram, an arrival counter and a 16-byte state
    per pass (3), plus its rows in the uploaded split tables; nothing more when none split."""
    ext = _ext()
    it, md, bs = _vocab_plan()
    plan = _plan(ext, it, md, bs, split)
    n = len(plan["split_matrices"])
    assert n > 0
    assert plan["split_scratch_bytes"] == _align(n * 3 * 2048 * 4) + _align(n * 3 * 4) + _align(n * 3 * 16)
    none = _plan(ext, it, md, bs, NEVER)
    assert none["split_matrices"] == [] and none["split_scratch_bytes"] == 0 and none["grids"] == [6]
    uploaded = _align(8 * n) + _align(8 * (n + 1)) - _align(8)  # split_mat, split_first
    assert plan["workspace_bytes"] - none["workspace_bytes"] == uploaded + plan["split_scratch_bytes"]


@needs_extension
def test_default_threshold_splits_vocabulary_factors_not_ordinary_layers():
    """llava-7b, rank 16: q/k/v/o (4096 x 4096) and the MLP (4096 <-> 11008) stay one block per
    matrix; the 32,000-token lm_head B and embed_tokens A are split, into >= 16 blocks."""
    ext = _ext()
    default = ext.DEFAULT_SPLIT_ELEMS
    for n in (16 * 4096, 16 * 11008):
        assert n <= default
    assert 16 * 32000 > default and math.ceil(16 * 32000 / ext.SPLIT_SLICE) >= 16
    assert ext.SPLIT_SLICE % 8 == 0  # slices of a 16-byte aligned matrix start on 16-byte boundaries
    it, md, bs = _vocab_plan()
    assert _plan(ext, it, md, bs, default)["split_matrices"] == [1, 3, 4]  # the two B of lm_head, embed's A


@needs_extension
def test_binding_rejects_a_negative_threshold():
    ext = _ext()
    it, md, bs = _raw()
    with pytest.raises(ValueError, match="split_elems must be >= 0"):
        ext.workspace_size(it.data_ptr(), 3, bs.data_ptr(), md.data_ptr(), 2, -1)
    with pytest.raises(ValueError, match="split_elems must be >= 0"):
        ext.robustmerge(it.data_ptr(), 3, bs.data_ptr(), md.data_ptr(), 2, 2.0, 0, FAKE, split_elems=-1)


# --------------------------------------------------------------------------------------
# On a GPU: every split choice gives the same bits
# --------------------------------------------------------------------------------------
SPLITS = {"forced": 0, "mid": 40000, "never": NEVER}


class _SpyExt:
    """The extension, recording the split_elems each robustmerge() call receives (the last
    positional argument cuda.py passes), so a test knows which threshold reached the kernels."""

    def __init__(self, ext):
        self._ext, self.splits = ext, []

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def robustmerge(self, *args):
        self.splits.append(args[-1])
        return self._ext.robustmerge(*args)


def _cuda(split):
    from robustmerge_kernels.backends.cuda import CudaBackend

    impl = CudaBackend(split_elems=split)
    impl._ext = _SpyExt(impl._ext)
    return BackendUnderTest("cuda", impl, torch.device("cuda"))


def _split_of(mods, params, split):
    """select_plan for these inputs, from the same host tables the backend builds."""
    ext = _ext()
    t = plan_tables.build_tables(mods, params, torch.device("cpu"))
    return _plan(ext, t.items, t.modules, t.b_scale, split)


def _large_module(seed, dtype, T=3, r=16, n=300, m=20000):
    """B has 320,000 keys: split into 10 slices (the last one partial) unless split is never."""
    return random_module(seed, T=T, r=r, n=n, m=m, dtype=dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("split", list(SPLITS.values()), ids=list(SPLITS))
def test_split_matches_reference_cpu_and_one_block(split, dtype):
    a, b = _large_module(1, dtype)
    a[1][3, 7:] = 0.0  # a crowded bin of zeros
    params = RobustMergeParams(density=0.2)
    mods = [module_inputs(a, b)]
    plan = _split_of(mods, params, split)
    assert (1 in plan["split_matrices"]) == (split != NEVER)  # item 0's B: the path under test
    backend = _cuda(split)
    det = check_against_reference(backend, a, b, density=0.2)  # masks, scales, A* vs the cpu kernel
    assert backend.impl._ext.splits == [split]  # the threshold reached the binding
    one = _cuda(NEVER).run([module_inputs(a, b, device="cuda")], params)
    for x, y in zip(det.tau_a + det.tau_b, one.tau_a + one.tau_b):
        assert torch.equal(x, y)
    for x, y in zip(det.scales, one.scales):
        assert torch.equal(x, y)
    assert torch.equal(det.outputs[0][0], one.outputs[0][0]) and torch.equal(det.outputs[0][1], one.outputs[0][1])


@needs_gpu
@pytest.mark.parametrize("density", [1.0, 0.999, 1e-6])
def test_split_ties_and_extreme_ranks(density):
    """All keys in a handful of bins (ties) and k at the ends (k < 1: everything kept;
    k = 1: the smallest key), float32 so the split's third pass runs."""
    g = torch.Generator().manual_seed(3)
    a = [torch.randint(0, 3, (16, 300), generator=g).float() * 0.5 for _ in range(2)]
    b = [torch.randint(0, 3, (20000, 16), generator=g).float() * 0.25 for _ in range(2)]
    params = RobustMergeParams(density=density)
    forced = _cuda(0).run([module_inputs(a, b, device="cuda")], params)
    never = _cuda(NEVER).run([module_inputs(a, b, device="cuda")], params)
    cpu = CpuBackend().run([module_inputs(a, b)], params, True)
    for x, y, z in zip(forced.tau_a + forced.tau_b, never.tau_a + never.tau_b, cpu.tau_a + cpu.tau_b):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(forced.outputs[0][1], never.outputs[0][1])
    assert torch.equal(kernel_masks(b, forced.tau_b), kernel_masks(b, never.tau_b))


@needs_gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("where", [0, 32767, 32768, 5 * 32768 + 11, -1])  # slice edges, middle, end
@pytest.mark.parametrize("split", [0, NEVER], ids=["forced", "never"])
def test_split_reports_non_finite_member_and_factor(split, dtype, where):
    a, b = _large_module(2, dtype, T=3)
    b[2].view(-1)[where] = float("nan") if where % 2 else float("inf")
    small_a, small_b = random_module(4, T=3, r=4, n=40, m=30, dtype=dtype)
    mods = [
        module_inputs(small_a, small_b, name="small", device="cuda"),
        module_inputs(a, b, name="big", device="cuda"),
    ]
    with pytest.raises(NonFiniteInput) as info:
        _cuda(split).impl.run(mods, RobustMergeParams())
    assert info.value.plan.name == "big" and info.value.member == 2 and info.value.factor == "B"


@needs_gpu
@pytest.mark.parametrize("env,expected", [(None, "default"), ("0", 0), ("123456", 123456)])
def test_threshold_from_the_environment_reaches_the_binding(monkeypatch, env, expected):
    from robustmerge_kernels.backends.cuda import CudaBackend

    if env is None:
        monkeypatch.delenv(SPLIT_ENV, raising=False)
    else:
        monkeypatch.setenv(SPLIT_ENV, env)
    impl = CudaBackend()
    impl._ext = spy = _SpyExt(impl._ext)
    a, b = random_module(5, T=2, r=4, n=40, m=30, dtype=torch.float32)
    impl.run([module_inputs(a, b, device="cuda")], RobustMergeParams())
    assert spy.splits == [_ext().DEFAULT_SPLIT_ELEMS if expected == "default" else expected]


@needs_gpu
def test_split_many_large_matrices_in_one_group_match_cpu():
    """Several split matrices of different sizes, dtypes and slice counts in one group, beside
    one-block ones, split forced and default: thresholds equal the cpu kernel's."""
    specs = [(torch.float32, 20000), (torch.bfloat16, 33000), (torch.float16, 2049), (torch.float32, 70001)]
    groups = [random_module(10 + i, T=2, r=8, n=64, m=m, dtype=dt) for i, (dt, m) in enumerate(specs)]
    params = RobustMergeParams(density=0.3)
    cpu = CpuBackend().run([module_inputs(a, b, name=f"m{i}") for i, (a, b) in enumerate(groups)], params, True)
    for split in (0, 100000, None):
        from robustmerge_kernels.backends.cuda import CudaBackend

        mods = [module_inputs(a, b, name=f"m{i}", device="cuda") for i, (a, b) in enumerate(groups)]
        det = CudaBackend(split_elems=split).run(mods, params, details=True)
        for x, y in zip(det.tau_a + det.tau_b, cpu.tau_a + cpu.tau_b):
            assert torch.equal(x.cpu(), y), split
        for (ga, _), (ca, _) in zip(det.outputs, cpu.outputs):
            assert torch.equal(ga.cpu().view(torch.uint8), ca.view(torch.uint8)), split
