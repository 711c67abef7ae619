"""The CUDA selection kernel (csrc/robustmerge/cuda/select.cuh, unmodified) run on the CPU.

tests/cuda_emu/cuda_runtime.h emulates the CUDA subset the kernel uses (threads as fibers,
cooperative barriers and warp intrinsics, blocks one after another in a shuffled order);
select_emu.cpp runs both selection paths, one block per matrix and the split path, on plans
with float32 / float16 / bfloat16 matrices, slices with partial tails, ties, k at both
ends, inf/NaN at a slice boundary and at the end, and misaligned data, and compares every
threshold and status bit with a sort. It checks the kernel's logic where no GPU is; memory
ordering between blocks, real concurrency and speed need one (tests/test_cuda_split.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on the PATH")
def test_selection_kernel_on_the_host_emulation_matches_a_sort(tmp_path):
    exe = tmp_path / "select_emu"
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-unused-but-set-variable",
         "-I", str(ROOT / "tests" / "cuda_emu"), "-I", str(ROOT / "csrc"), "-o", str(exe),
         str(ROOT / "tests" / "cuda_emu" / "select_emu.cpp")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("all ok"), run.stdout + run.stderr
    # Both paths ran: every case with the split forced, at 40,000 keys and never.
    for case in ("mixed", "ties", "nonfinite+misaligned"):
        assert f"{case} split_elems=0: " in run.stdout and f"{case} split_elems=40000: " in run.stdout
        assert f"{case} split_elems={1 << 62}: grids " in run.stdout
