"""The CUDA backend's kernels (csrc/robustmerge/cuda/, unmodified) run on the CPU.

tests/cuda_emu/cuda_runtime.h emulates the CUDA subset the kernels use (threads as fibers
in a random order per round, cooperative barriers and warp intrinsics, blocks one after
another in a shuffled order, shared memory and the workspace starting with random bytes,
alignment checks on vector loads; its header says what it checks and what it cannot).

* select_emu.cpp runs the selection kernel on both of its paths, one block per matrix and
  the split path, on plans with float32 / float16 / bfloat16 matrices, slices with partial
  tails, ties, k at both ends, inf/NaN at a slice boundary and at the end, and misaligned
  data, and compares every threshold and status bit with a sort.
* merge_emu.cpp (through tests/_cuda_emu.py) runs the whole merge as the binding and the
  launcher do: validation, HostPlan's workspace, upload and memset, the launches of
  HostPlan::launches() (select, fuse_a, weights, fuse_b, with the launcher's grids) and its
  result copies, on tables built by build_tables from CPU tensors. Every merge is compared
  with the CPU backend (_cpu): item and module status and thresholds bit for bit, A* bit
  for bit, the A-row scales and B* bit for bit where the row sums are exact in float64
  (every case but the two made to round; there the kernels' summation orders differ: within
  1e-12 and the dtype's tolerance), and with the reference and the oracle within tolerance
  (tests/_backends.check_against_reference). Covered: float32 / float16 / bfloat16 inputs,
  mixed in a module and a merge, float32 / float16 / bfloat16 / float64 outputs; T = 1, 2,
  3, 4, 5, 9 (more than one 8-adapter chunk), 64; rank 1 and rank 70 (B weights read from
  global memory, not staged); odd and tiny shapes (1 x 1), rows of more than one
  2048-element tile, B* of several tiles; ties, zeros, -0.0, subnormals, huge values; k = 0,
  k = N - 1, k = N; inf/NaN inputs; output overflow per factor; inputs at odd element
  offsets; the split selection forced on and off (and, marked slow, over several slices);
  the same bits under every block and thread order.

This checks the kernels' logic and arithmetic where no GPU is. Memory ordering between
blocks, real concurrency, resource limits and speed need one (tests/test_cuda_backend.py,
tests/test_cuda_split.py).
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from _backends import BackendUnderTest, check_against_reference, check_many_modules
from _cases import CASES, KERNEL_DTYPES, KERNEL_IDS, make_case, module_inputs, random_module
from _cuda_emu import COMPILER, NEVER, EmulatedCuda, assert_same_as_cpu, bits, compile_emulation, run_cpu

from robustmerge_kernels.backends import NonFiniteInput, OutputOverflow
from robustmerge_kernels.params import RobustMergeParams

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on the PATH")
SPLITS = {"one-block": NEVER, "split": 0}  # split_elems: every matrix on one path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return compile_emulation("merge_emu.cpp", tmp_path_factory.mktemp("cuda_emu") / "merge_emu.so", "-shared", "-fPIC")


def emulated(library, split: str) -> BackendUnderTest:
    return BackendUnderTest("cuda-emu", EmulatedCuda(library, SPLITS[split]), torch.device("cpu"))


def check_case(library, split, a, b, **kw):
    """The emulated merge of one module against the reference (check_against_reference)
    and bit for bit against the CPU backend; returns whether everything was compared bit
    for bit (row sums exact)."""
    backend = emulated(library, split)
    check_against_reference(backend, a, b, **kw)
    params = RobustMergeParams(kw.get("density", 0.2), kw.get("clamp_quantile", 0.8), kw.get("lam", 2.0))
    group = [module_inputs(a, b, kw.get("b_scale"), kw.get("out_dtype"))]
    return assert_same_as_cpu(backend.impl.last, run_cpu(group, params), group)


def test_selection_kernel_on_the_host_emulation_matches_a_sort(tmp_path):
    exe = compile_emulation("select_emu.cpp", tmp_path / "select_emu")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("all ok"), run.stdout + run.stderr
    # Both paths ran: every case with the split forced, at 40,000 keys and never.
    for case in ("mixed", "ties", "nonfinite+misaligned"):
        assert f"{case} split_elems=0: " in run.stdout and f"{case} split_elems=40000: " in run.stdout
        assert f"{case} split_elems={1 << 62}: grids " in run.stdout


def test_launches_are_the_launchers_plan(library):
    """The emulated merge makes HostPlan's launches: 1 + 2 split passes of the selection
    with the split forced (float32), one fuse_a block per (row, 2048-element segment), one
    weights block per module, one fuse_b block per 2048 elements of B*; and the same
    selection grids as the real binding's select_plan where the CUDA module is built."""
    a1, b1 = random_module(0, T=2, r=3, n=2100, m=5, dtype=torch.float32)
    a2, b2 = random_module(1, T=1, r=2, n=7, m=1500, dtype=torch.bfloat16)
    group = [module_inputs(a1, b1, name="m0"), module_inputs(a2, b2, name="m1")]
    params = RobustMergeParams()
    tail = [("fuse_a", 3 * 2 + 2 * 1, 256, 0), ("weights", 2, 128, 0), ("fuse_b", 1 + 2, 256, 0)]
    one = EmulatedCuda(library, NEVER).launches(group, params)
    assert one == [("select", 2 * 3, 512, 0), *tail]
    split = EmulatedCuda(library, 0).launches(group, params)  # 6 matrices, one 32,768-key slice each
    assert split == [("select", 6 + 6, 512, 0), ("select", 6, 512, 1), ("select", 6, 512, 2), *tail]
    try:
        from robustmerge_kernels import _cuda
    except ImportError:
        return
    from robustmerge_kernels.backends.tables import build_tables

    t = build_tables(group, params, torch.device("cpu"))
    for split_elems, launches in ((NEVER, one), (0, split)):
        plan = _cuda.select_plan(
            t.items.data_ptr(), t.n_items, t.b_scale.data_ptr(), t.modules.data_ptr(), 2, split_elems
        )
        assert plan["grids"] == [blocks for kernel, blocks, _, _ in launches if kernel == "select"]


def _odd_views(xs, offset):
    """Each tensor as a view starting `offset` elements into a larger buffer (misaligned data)."""
    out = []
    for x in xs:
        buf = torch.zeros(x.numel() + offset, dtype=x.dtype)
        buf[offset:] = x.reshape(-1)
        out.append(buf[offset:].view(x.shape))
    return out


def _case(name, dtype):
    """(a, b, kwargs of check_against_reference) of the emulated-merge cases: _cases.CASES,
    and shapes and layouts that take other paths of the CUDA kernels. A clamp quantile
    below (r - 1) / r where r is small: with the default 0.8 every row of a rank <= 4 task
    is clamped to its largest scale, so the fusion weights would not depend on the column."""
    if name in CASES:
        a, b, kw = make_case(name, dtype)
        if name in ("huge", "huge_mixed"):  # merged values past the dtype's range are refused, not compared
            kw = {**kw, "lam": 1.0 / len(a)}
        return a, b, kw
    if name == "T2_odd":  # in / out not multiples of 4, 8 or 16
        a, b = random_module(3, T=2, r=3, n=37, m=21, dtype=dtype)
        return a, b, dict(density=0.3, clamp_quantile=0.3, b_scale=[0.5, 2.0])
    if name == "T5":
        a, b = random_module(4, T=5, r=4, n=40, m=24, dtype=dtype)
        return a, b, dict(clamp_quantile=0.3)
    if name == "T9_tiny":  # more adapters than one kStage chunk (8); 1 x 1 matrices
        a, b = random_module(5, T=9, r=1, n=1, m=1, dtype=dtype)
        return a, b, dict(density=0.5)
    if name == "misaligned":  # every input at an odd element offset: scalar loads, no 16-byte vectors
        a, b = random_module(6, T=2, r=3, n=41, m=19, dtype=dtype)
        return _odd_views(a, 1), _odd_views(b, 3), dict(clamp_quantile=0.3)
    if name == "wide":  # rows of two 2048-element segments; B* of two tiles, the second from column 2048 % 3
        a, b = random_module(7, T=2, r=3, n=2100, m=900, dtype=dtype)
        return a, b, dict(density=0.4, clamp_quantile=0.0)
    if name == "rank70":  # rank > kStagedRank (64): fuse_b reads the weights from global memory
        a, b = random_module(8, T=2, r=70, n=3, m=5, dtype=dtype)
        return a, b, {}
    if name == "k_N":  # density so small that k = N (1 - 1e-18 == 1.0): tau = the largest magnitude
        a, b = random_module(10, T=2, r=2, n=6, m=5, dtype=dtype)
        return a, b, dict(density=1e-18)
    if name == "wide_range":  # magnitudes over 2^-60 .. 1: row sums round, in an order-dependent way
        a, b = random_module(9, T=3, r=4, n=300, m=20, dtype=torch.float64)
        g = torch.Generator().manual_seed(9)
        a = [(x * torch.exp2(-60 * torch.rand(x.shape, generator=g, dtype=torch.float64))).to(dtype) for x in a]
        return a, [x.to(dtype) for x in b], {}
    raise KeyError(name)


EXTRA_CASES = ["T2_odd", "T5", "T9_tiny", "misaligned", "wide", "rank70", "k_N", "wide_range"]
INEXACT = {"huge_mixed", "wide_range"}  # float32 / bfloat16 row sums that round


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("case", CASES + EXTRA_CASES)
def test_merge_matches_the_cpu_backend_and_the_reference(library, case, split, dtype):
    a, b, kw = _case(case, dtype)
    exact = check_case(library, split, a, b, **kw)
    # Everything bit for bit, except where the row sums round (not for float16's range).
    assert exact == (case not in INEXACT or dtype == torch.float16), "row sums not as the case intends"


@pytest.mark.parametrize("split", list(SPLITS))
def test_mixed_dtypes_ranks_and_outputs_in_one_merge(library, split):
    """check_many_modules (float32 / float16 / bfloat16 inputs, mixed in a module, outputs
    of each kind and float64, T = 1 to 4; each module also merged alone), and the whole
    group bit for bit against the CPU backend."""
    backend = emulated(library, split)
    check_many_modules(backend)
    specs = [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.bfloat16, torch.float16)]
    group = []
    for i, (dt, od) in enumerate(specs):
        a, b = random_module(20 + i, T=i + 1, r=2 + i, n=9 + 4 * i, m=11, dtype=torch.float64)
        a = [x.to(d) for x, d in zip(a, [dt, torch.bfloat16, torch.float32])]
        b = [x.to(d) for x, d in zip(b, [torch.float16, dt, torch.float32])]
        group.append(module_inputs(a, b, [1.0, 0.5, 3.0][: i + 1], od, name=f"m{i}"))
    params = RobustMergeParams(density=0.3, clamp_quantile=0.5, lam=1.5)
    assert assert_same_as_cpu(backend.impl.raw(group, params), run_cpu(group, params), group)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_set_the_cpu_backends_status(library, dtype, factor, bad):
    """inf/NaN in one matrix of the second of two modules (the other module finite): the
    same item status and thresholds as the CPU backend, on both selection paths, and the
    backend names the member and factor; density 1.0 (k = 0) still checks."""
    a0, b0 = random_module(30, T=2, r=2, n=9, m=7, dtype=dtype)
    a1, b1 = random_module(31, T=3, r=3, n=13, m=5, dtype=dtype)
    (a1 if factor == "A" else b1)[2].view(-1)[-1] = -bad
    group = [module_inputs(a0, b0, name="m0"), module_inputs(a1, b1, name="m1")]
    for split, density in (("one-block", 0.2), ("split", 0.2), ("one-block", 1.0), ("split", 1.0)):
        params = RobustMergeParams(density=density)
        backend = EmulatedCuda(library, SPLITS[split])
        cpu = run_cpu(group, params)
        assert cpu.status.tolist() == [0, 0, 0, 0, 1 if factor == "A" else 2]
        assert_same_as_cpu(backend.raw(group, params), cpu, group)
        with pytest.raises(NonFiniteInput) as info:
            backend.run(group, params)
        assert (info.value.plan.name, info.value.member, info.value.factor) == ("m1", 2, factor)


@pytest.mark.parametrize(
    "out_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=["fp16", "bf16", "fp32", "fp64"]
)
@pytest.mark.parametrize("factor", ["A", "B"])
def test_output_overflow_sets_the_cpu_backends_module_status(library, out_dtype, factor):
    """Finite inputs whose merge overflows the output dtype in one factor of one module:
    the same module status as the CPU backend, and the same bits (inf included)."""
    huge = {torch.float16: 3e4}.get(out_dtype, 3e38)  # float64 out: the float32 accumulator overflows
    a, b = random_module(40, T=2, r=4, n=8, m=6, dtype=torch.float32)
    for x in a if factor == "A" else b:
        x.view(-1)[::3] = huge
    ok_a, ok_b = random_module(41, T=2, r=2, n=5, m=3, dtype=torch.float32)
    group = [
        module_inputs(ok_a, ok_b, name="ok", out_dtype=out_dtype),
        module_inputs(a, b, name="big", out_dtype=out_dtype),
    ]
    params = RobustMergeParams(density=0.5, lam=3.0)
    for split in SPLITS:
        backend = EmulatedCuda(library, SPLITS[split])
        cpu = run_cpu(group, params)
        assert cpu.module_status.tolist() == [0, 1 if factor == "A" else 2]
        assert_same_as_cpu(backend.raw(group, params), cpu, group)
        with pytest.raises(OutputOverflow) as info:
            backend.run(group, params)
        assert (info.value.plan.name, info.value.factor) == ("big", factor)


@pytest.mark.parametrize("case", ["wide_range", "T9_tiny"])
def test_same_bits_whatever_the_block_and_thread_order(library, case):
    """Every block, thread and initial-memory order gives the same bits (fixed-order sums,
    no float atomics), also where the row sums round (wide_range: the CPU backend, which
    sums in another order, is only within tolerance there)."""
    a, b, kw = _case(case, torch.float32)
    group = [module_inputs(a, b)]
    params = RobustMergeParams(density=kw.get("density", 0.2))
    runs = [
        EmulatedCuda(library, split, seed=100 * seed).raw(group, params) for seed in range(3) for split in (NEVER, 0)
    ]
    for run in runs[1:]:
        for x, y in zip(
            (*run.tables.outputs[0], run.scales, run.tau), (*runs[0].tables.outputs[0], runs[0].scales, runs[0].tau)
        ):
            assert torch.equal(bits(x), bits(y)), "the merge depends on the schedule"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
def test_split_selection_over_several_slices_in_the_merge(library, dtype):
    """Matrices of 2-3 32,768-key slices (partial last slice) on the split path, at split_elems
    0, between the two matrices' sizes, and never: the same merge every time."""
    a, b = random_module(50, T=2, r=2, n=20000, m=17000, dtype=dtype)
    group = [module_inputs(a, b)]
    params = RobustMergeParams(density=0.3)
    cpu = run_cpu(group, params)
    for split_elems in (0, 36000, NEVER):
        backend = EmulatedCuda(library, split_elems)
        selects = [blocks for kernel, blocks, _, _ in backend.launches(group, params) if kernel == "select"]
        expect = {0: 4 + 2 * (2 + 2), 36000: 4 + 2 * 2, NEVER: 4}[split_elems]
        assert selects[0] == expect and len(selects) == (
            1 if split_elems == NEVER else 2 if dtype != torch.float32 else 3
        )
        assert_same_as_cpu(backend.raw(group, params), cpu, group)
