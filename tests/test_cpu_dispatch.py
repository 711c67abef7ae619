"""The CPU backend's SIMD dispatch (csrc/robustmerge/dispatch.h): every path this CPU supports,
forced in turn, gives exact thresholds and byte-identical merges to the others and to the
reference masks; paths are forced by name or $ROBUSTMERGE_SIMD and refused when unknown."""

from __future__ import annotations

import csv
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cases import KERNEL_DTYPES, KERNEL_IDS, kernel_masks, module_inputs, random_module

from robustmerge_kernels import cli
from robustmerge_kernels.backends import BackendUnavailable
from robustmerge_kernels.backends import cpu as cpu_backend
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.reference import robustmerge_module

_cpu = pytest.importorskip("robustmerge_kernels._cpu")
PATHS = [name for name, ok in _cpu.simd_paths().items() if ok]  # best first
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture
def simd():
    """Force a SIMD path for one test; back to the CPU's best afterwards."""
    yield _cpu.set_simd_path
    _cpu.set_simd_path("auto")
    cpu_backend.set_num_threads(None)


def test_paths_compiled_and_the_best_supported_is_default(simd):
    paths = _cpu.simd_paths()
    assert list(paths)[-1] == "portable" and paths["portable"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # torch's own CPU probe agrees
        assert paths.get("avx2") is True
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert paths.get("avx512") is True
    assert _cpu.simd_path() == PATHS[0]
    for name in PATHS:
        simd(name)
        assert _cpu.simd_path() == name
    simd("auto")
    assert _cpu.simd_path() == PATHS[0]


def test_unknown_path_refused(simd):
    with pytest.raises(ValueError, match="unknown SIMD path 'sse9'.*portable"):
        simd("sse9")
    assert _cpu.simd_path() == PATHS[0]  # unchanged


def test_path_the_cpu_lacks_refused(simd):
    lacking = [name for name, ok in _cpu.simd_paths().items() if not ok]
    if not lacking:
        pytest.skip("this CPU supports every compiled path")
    with pytest.raises(ValueError, match="does not support"):
        simd(lacking[0])


def test_env_var_forces_the_path_and_names_a_bad_one(monkeypatch, simd):
    for name in PATHS:
        monkeypatch.setenv(cpu_backend.ENV_SIMD, name)
        cpu_backend.CpuBackend()
        assert cpu_backend.simd_path() == name
    monkeypatch.setenv(cpu_backend.ENV_SIMD, "neon9")
    with pytest.raises(BackendUnavailable, match=r"\$ROBUSTMERGE_SIMD=neon9: unknown SIMD path"):
        cpu_backend.CpuBackend()


def test_backends_command_prints_the_path(monkeypatch, capsys, simd):
    monkeypatch.setenv(cpu_backend.ENV_SIMD, PATHS[-1])
    assert cli.main(["backends"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu "))
    assert f"simd {PATHS[-1]} (compiled: " in line


# ------------------------------------------------------------------ exact thresholds


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:
        return x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return x.view(torch.int16).to(torch.int64) & 0x7FFF


def sample_starts(n: int) -> list[int]:
    """Where select.h samples (64 runs of 16 keys at golden-ratio positions)."""
    return [((j * 0x9E3779B97F4A7C15) % (1 << 64)) * (n - 16) >> 64 for j in range(64)]


def adversarial(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    if kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).double() * 0.25
    elif kind == "sparse":  # most keys zero: the k-th is often 0 itself
        x = x * (torch.rand(n, generator=g, dtype=torch.float64) < 0.1)
    elif kind == "sorted":  # rank follows position: a strided sample would see a skewed picture
        x = x.abs().sort().values
    elif kind == "rowscaled":  # A rows of very different scale
        x = x * torch.logspace(-3, 3, 16, dtype=torch.float64).repeat_interleave(n // 16 + 1)[:n]
    elif kind == "sample_miss":  # tiny exactly where the sample looks: the bracket misses
        for s in sample_starts(n):
            x[s : s + 16] = 1e-6
    elif kind == "subnormal":
        x = torch.randint(-100, 101, (n,), generator=g).double() * torch.finfo(dtype).smallest_normal / 64
    return x.to(dtype)


def kernel_thresholds(xs: list[torch.Tensor], ks: list[int]) -> tuple[list[int], list[int]]:
    table = torch.tensor([[x.data_ptr(), DTYPE_CODE[x.dtype], x.numel(), k] for x, k in zip(xs, ks)], dtype=torch.int64)
    keys = torch.zeros(len(xs), dtype=torch.int32)
    status = torch.zeros(len(xs), dtype=torch.int32)
    _cpu.thresholds(table.data_ptr(), len(xs), 2, keys.data_ptr(), status.data_ptr())
    return [int(k) & 0xFFFFFFFF for k in keys], status.tolist()


KINDS = ["gauss", "ties", "sparse", "sorted", "rowscaled", "sample_miss", "subnormal"]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_thresholds_exact_on_every_path(kind, dtype, simd):
    """Sizes on both sides of the sampled bracket (16384 keys) and with a SIMD tail; k at the
    edges (1, n) and inside; each path equals torch.kthvalue of the magnitude keys."""
    xs, ks, expected = [], [], []
    for n in (1000, 16384, 65536 + 16 * 1024 + 13):
        x = adversarial(kind, n, dtype, seed=n)
        keys = magnitude_keys(x)
        for k in (1, 2, n // 2, int(0.8 * n), n - 1, n):
            xs.append(x)
            ks.append(k)
            expected.append(int(keys.kthvalue(k).values))
    for name in PATHS:
        simd(name)
        got, status = kernel_thresholds(xs, ks)
        assert status == [0] * len(xs)
        bad = [(x.numel(), k, e, g) for x, k, e, g in zip(xs, ks, expected, got) if e != g]
        assert not bad, f"{name}: (n, k, expected, got) {bad[:4]}"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
def test_non_finite_found_on_every_path(dtype, simd):
    n = 65536 + 5
    cases = []
    for where in (0, 7, n // 3, n - 1):  # vector body and scalar tail
        for bad in (float("inf"), float("-inf"), float("nan")):
            x = adversarial("gauss", n, dtype)
            x[where] = bad
            cases.append(x)
    cases.append(adversarial("gauss", n, dtype))
    for name in PATHS:
        simd(name)
        for k in (0, int(0.8 * n)):
            _, status = kernel_thresholds(cases, [k] * len(cases))
            assert status == [1] * (len(cases) - 1) + [0], f"{name}, k={k}"


# ------------------------------------------------------------------ whole merges


def _modules(dtype, r, big):
    mods = []
    shapes = [(4096, 1100), (1200, 4096)] if big else [(40 + 7 * i, 33 + 5 * i) for i in range(6)]
    for i, (n, m) in enumerate(shapes):
        a, b = random_module(100 * r + i, T=4, r=r, n=n, m=m, dtype=dtype)
        if i % 2:  # heavy ties in one factor
            a = [(x.double() * 64).round().div(64).to(dtype) for x in a]
        else:  # exponents spread so wide that the float64 row sums round: their order shows
            g = torch.Generator().manual_seed(i)
            lo, hi = (-12, 5) if dtype == torch.float16 else (-40, 40)
            a = [(x.double() * 2.0 ** torch.randint(lo, hi, x.shape, generator=g)).to(dtype) for x in a]
        mods.append(module_inputs(a, b, b_scale=[1.0, 0.5, 2.0, 1.5], name=f"m{i}"))
    return mods


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("r,big", [(16, True), (17, True), (3, False), (16, False)])
def test_merges_byte_identical_across_paths_and_threads(dtype, r, big, simd):
    """Outputs, thresholds and scales: every path x thread count (both schedules: 2 big
    modules are fewer than 2 x threads, 6 small ones are not for 1-2 threads) gives the
    same bytes, and the masks are the reference's."""
    mods = _modules(dtype, r, big)
    params = RobustMergeParams()
    runs = {}
    for name in PATHS:
        simd(name)
        for threads in (1, 2, 5):
            cpu_backend.set_num_threads(threads)
            runs[name, threads] = cpu_backend.CpuBackend().run(mods, params, details=True)
    (first_key, first), *others = runs.items()
    for key, det in others:
        for (a0, b0), (a1, b1) in zip(first.outputs, det.outputs):
            assert torch.equal(_as_bytes(a0), _as_bytes(a1)), f"A* of {key} differs from {first_key}"
            assert torch.equal(_as_bytes(b0), _as_bytes(b1)), f"B* of {key} differs from {first_key}"
        assert all(torch.equal(_as_bytes(s0), _as_bytes(s1)) for s0, s1 in zip(first.scales, det.scales)), key
        assert [float(t) for t in first.tau_a] == [float(t) for t in det.tau_a], key
        assert [float(t) for t in first.tau_b] == [float(t) for t in det.tau_b], key
    for i, mod in enumerate(mods):  # items are the modules' members in order, T = 4 each
        ref = robustmerge_module(mod.a, mod.b, params, list(mod.plan.b_scale))
        assert torch.equal(kernel_masks(mod.a, first.tau_a[4 * i : 4 * i + 4]), ref.mask_a)
        assert torch.equal(kernel_masks(mod.b, first.tau_b[4 * i : 4 * i + 4]), ref.mask_b)


# ------------------------------------------------------------------ older CPUs (qemu-user)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """tests/cpu_dispatch_probe.cpp built as the module is by default (no -march flags)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or platform.machine() != "x86_64":
        pytest.skip("needs a C++ compiler on x86-64")
    exe = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(
        [cxx, "-std=c++17", "-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-pthread",
         f"-I{REPO / 'csrc'}", str(REPO / "tests" / "cpu_dispatch_probe.cpp"), "-o", str(exe)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return exe


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_probe_same_bits_on_every_path(probe):
    runs = {name: _run([str(probe), name]).stdout.split() for name in PATHS}
    assert all(out[:2] == [name, "1"] for name, out in runs.items()), runs
    assert len({out[2] for out in runs.values()}) == 1, runs
    assert _run([str(probe)]).stdout.split()[0] == PATHS[0]


@pytest.mark.parametrize("model,expected", [("qemu64", "portable"), ("Nehalem", "portable"), ("Haswell", "avx2")])
def test_older_cpus_dispatch_to_what_they_have(probe, model, expected):
    """x86-64-v1 (qemu64) and -v2 (Nehalem) run the portable path with no illegal instruction,
    AVX2-only Haswell the AVX2 path, all with the same bits; forcing AVX2 on Nehalem is refused."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-user (qemu-x86_64) is not installed")
    native = _run([str(probe), "portable"]).stdout.split()[2]
    out = _run([qemu, "-cpu", model, str(probe)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [expected, "1", native]
    if expected == "portable":
        refused = _run([qemu, "-cpu", model, str(probe), "avx2"])
        assert refused.returncode != 0 and "does not support" in refused.stderr


def test_aarch64_portable_path_gives_the_same_bits(probe, tmp_path):
    """The portable path built for aarch64 (NEON by auto-vectorisation, the build's flags:
    -O3 -ffp-contract=off, which GCC would otherwise turn into fused multiply-adds there)
    and run under qemu-user gives the same outputs, thresholds and scales as x86-64."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "probe-aarch64"
    subprocess.run(
        [cxx, "-std=c++17", "-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-pthread", "-static",
         f"-I{REPO / 'csrc'}", str(REPO / "tests" / "cpu_dispatch_probe.cpp"), "-o", str(exe)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    native = _run([str(probe), "portable"]).stdout.split()
    out = _run([qemu, str(exe)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == native  # "portable 1 <hash>": no x86 path exists there


def test_cpu_module_sources_compile_with_clang():
    """The CPU module (binding, kernels, dispatch) compiles warning-free with clang as with
    GCC: clang lacked __builtin_cpu_supports("f16c") before version 16 and parses some
    declarations differently (checked where clang++ is installed)."""
    clang = shutil.which("clang++")
    if clang is None:
        pytest.skip("clang++ is not installed")
    import sysconfig

    import pybind11

    out = _run([clang, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'csrc'}",
                f"-I{REPO / 'python'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                str(REPO / "python" / "cpu_bindings.cpp")])  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]


def test_per_path_benchmark_script_runs(tmp_path):
    """benchmarks/cpu_simd.py (the README's per-path table) on a tiny case: every path's row,
    outputs checked byte-identical by the script itself."""
    out = tmp_path / "simd.csv"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_simd.py"), "clip-vit-b32:2:bf16:1", "--rounds", "1",
         "--csv", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ROBUSTMERGE_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["copy-flat", *(f"cpu-{p}" for p in PATHS)]
    assert all(float(r["median_s"]) > 0 and r["threads"] == "2" for r in rows)
