"""The CUDA backend's kernels run on the CPU: tests/cuda_emu compiled with the host C++
compiler, and the pieces tests/test_cuda_emulated.py compares with the CPU backend.

``EmulatedCuda`` is a kernel backend whose kernel call is tests/cuda_emu/merge_emu.cpp, the
binding's and launcher's work with every CUDA kernel (unmodified) on the host emulation of
tests/cuda_emu/cuda_runtime.h. It takes CPU tensors: ``build_tables`` makes the same
tables as for the cuda backend, whose addresses are host addresses here. ``run_cpu`` and
``EmulatedCuda.raw`` return every array a kernel writes (outputs, item and module status,
thresholds, scales), for ``assert_same_as_cpu``.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from _cases import TOLERANCES, smallest_subnormal

from robustmerge_kernels.backends.base import KernelBackend
from robustmerge_kernels.backends.cpu import CpuBackend, get_num_threads
from robustmerge_kernels.backends.tables import PlanTables, build_tables, raise_kernel_status, unpack_details

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
COMPILER = shutil.which("g++") or shutil.which("c++")
NEVER = 1 << 62  # split_elems: no matrix takes the split selection
KERNELS = ("select", "fuse_a", "weights", "fuse_b")  # rmc::Kernel's order (host_plan.cuh)

# The kernels compiled as host code: the real build's arithmetic (nvcc --fmad=false: no
# contraction; IEEE float and double), vector loads and stores through uint4 pointers (no
# strict aliasing). The kernels' code is device code nvcc keeps from the host compiler's
# -Wall, so two warnings it cannot give are off: unsigned threadIdx against int counts, and
# __shared__ variables the host compiler sees only written.
FLAGS = [
    "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-sign-compare",
    "-Wno-unused-but-set-variable", "-ffp-contract=off", "-fno-strict-aliasing",
    *(["-fcf-protection=none"] if platform.machine() in ("x86_64", "AMD64") else []),  # fast fiber switches
    "-I", str(EMU), "-I", str(ROOT / "csrc"),
]  # fmt: skip


def compile_emulation(source: str, output: Path, *extra: str) -> Path:
    """Compile tests/cuda_emu/<source>; fails the test on an error or any warning."""
    build = subprocess.run(
        [COMPILER, *FLAGS, *extra, "-o", str(output), str(EMU / source)], capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    return output


@dataclass
class Raw:
    """Everything one kernel call wrote."""

    tables: PlanTables  # with the outputs (A*, B*) per module
    status: torch.Tensor  # int32 [W]
    module_status: torch.Tensor  # int32 [M]
    tau: torch.Tensor  # int32 [W, 2]
    scales: torch.Tensor  # float64, items' ranks concatenated


def _run(group, params, call) -> Raw:
    tables = build_tables(group, params, torch.device("cpu"))
    n_scales = sum(g.plan.rank * len(g.plan.members) for g in group)
    raw = Raw(
        tables,
        torch.zeros(tables.n_items, dtype=torch.int32),
        torch.zeros(len(group), dtype=torch.int32),
        torch.zeros((tables.n_items, 2), dtype=torch.int32),
        torch.zeros(n_scales, dtype=torch.float64),
    )
    call(tables, *(x.data_ptr() for x in (raw.status, raw.module_status, raw.tau, raw.scales)))
    return raw


def run_cpu(group, params) -> Raw:
    """The CPU backend's kernel (robustmerge_kernels._cpu) on ``group``."""
    ext = CpuBackend()._ext

    def call(t, status, module_status, tau, scales):
        ext.robustmerge(
            t.items.data_ptr(), t.n_items, t.b_scale.data_ptr(), t.modules.data_ptr(), t.modules.shape[0],
            float(params.lam), get_num_threads(), status, module_status, tau, scales,
        )  # fmt: skip

    return _run(group, params, call)


class EmulatedCuda(KernelBackend):
    """The cuda backend with its kernels on the host emulation (CPU tensors)."""

    name = "cuda-emu"
    checks_finite = True

    def __init__(self, library: Path, split_elems: int = NEVER, seed: int = 0):
        self.lib = ctypes.CDLL(str(library))
        u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
        self.lib.rmk_emu_merge.argtypes = [
            u64, i64, u64, u64, i64, ctypes.c_double, u64, u64, u64, u64, i64, u64, ctypes.c_char_p, ctypes.c_size_t,
        ]  # fmt: skip
        self.lib.rmk_emu_launches.argtypes = [u64, i64, u64, u64, i64, i64, ptr, i64, ctypes.c_char_p, ctypes.c_size_t]
        self.lib.rmk_emu_launches.restype = i64
        self.split_elems, self.seed = split_elems, seed
        self.last: Raw | None = None  # the arrays of the latest merge

    def raw(self, group, params) -> Raw:
        self.seed += 1  # every merge: other block, thread and memory orders

        def call(t, status, module_status, tau, scales):
            error = ctypes.create_string_buffer(1024)
            failed = self.lib.rmk_emu_merge(
                t.items.data_ptr(), t.n_items, t.b_scale.data_ptr(), t.modules.data_ptr(), t.modules.shape[0],
                float(params.lam), status, module_status, tau, scales, self.split_elems, self.seed, error, len(error),
            )  # fmt: skip
            if failed:  # 1: the binding's ValueError; 2: the emulation stopped a kernel (deadlock, bad load)
                raise (ValueError if failed == 1 else RuntimeError)(error.value.decode())

        self.last = _run(group, params, call)
        return self.last

    def launches(self, group, params) -> list[tuple[str, int, int, int]]:
        """(kernel, blocks, threads, pass) of every launch of ``group``'s merge, in order."""
        t = build_tables(group, params, torch.device("cpu"))
        out = torch.zeros((16, 4), dtype=torch.int64)
        error = ctypes.create_string_buffer(1024)
        n = self.lib.rmk_emu_launches(
            t.items.data_ptr(), t.n_items, t.b_scale.data_ptr(), t.modules.data_ptr(), t.modules.shape[0],
            self.split_elems, out.data_ptr(), out.shape[0], error, len(error),
        )  # fmt: skip
        if n < 0:
            raise ValueError(error.value.decode())
        return [(KERNELS[k], blocks, threads, p) for k, blocks, threads, p in out[:n].tolist()]

    def _run_kernel(self, group, params, details):
        raw = self.raw(group, params)
        raise_kernel_status(group, raw.tables, not bool(raw.status.any()), raw.status, raw.module_status)
        return raw.tables.outputs, unpack_details(group, raw.tau, raw.scales) if details else None


_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def row_sums_exact(group) -> bool:
    """Whether every sum of |A| values the kernels form (row sums and their parts, in any
    order) is exact in float64: each row's total stays below 2^52 units of the smallest ulp
    in the row. Then the CPU's and the GPU's summation orders give the same scales."""
    for g in group:
        for a in g.a:
            mag = a.detach().abs().double()
            _, exponent = torch.frexp(mag)  # mag = m * 2^exponent, m in [0.5, 1)
            ulp = torch.exp2((exponent - 1 - _MANTISSA_BITS[a.dtype]).double())
            ulp = torch.clamp(ulp, min=smallest_subnormal(a.dtype)).masked_fill(mag == 0, float("inf"))
            unit = ulp.min(dim=1).values
            if bool((mag.sum(dim=1) >= 2.0**52 * unit).any()):
                return False
    return True


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def assert_same_as_cpu(emu: Raw, cpu: Raw, group) -> bool:
    """The emulated merge against the CPU backend's: status, module status and thresholds
    bit for bit; with finite inputs also A* bit for bit, and the scales and B* bit for bit
    where the row sums are exact (row_sums_exact), else within tolerance (the kernels sum
    in other orders). Returns whether the bit-for-bit comparison of everything applied."""
    assert torch.equal(emu.status, cpu.status), f"item status {emu.status.tolist()} != cpu {cpu.status.tolist()}"
    assert torch.equal(emu.tau, cpu.tau), f"thresholds {emu.tau.tolist()} != cpu {cpu.tau.tolist()}"
    assert torch.equal(emu.module_status, cpu.module_status), (
        f"module status {emu.module_status.tolist()} != cpu {cpu.module_status.tolist()}"
    )
    if bool(cpu.status.any()):  # inf/NaN input: outputs and scales are undefined on both
        return False
    exact = row_sums_exact(group)
    for m, ((ea, eb), (ca, cb)) in enumerate(zip(emu.tables.outputs, cpu.tables.outputs)):
        assert torch.equal(bits(ea), bits(ca)), f"module {m}: A* differs from the cpu backend"
        if exact:
            assert torch.equal(bits(eb), bits(cb)), f"module {m}: B* differs from the cpu backend"
        else:
            rtol = TOLERANCES[cb.dtype].rtol
            torch.testing.assert_close(eb, cb, rtol=rtol, atol=1e-7, equal_nan=True, msg=f"module {m}: B*")
    if exact:
        assert torch.equal(bits(emu.scales), bits(cpu.scales)), "scales differ from the cpu backend"
    else:
        torch.testing.assert_close(emu.scales, cpu.scales, rtol=1e-12, atol=0.0)
    return exact
