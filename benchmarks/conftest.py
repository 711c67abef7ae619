"""pytest-benchmark harness for robustmerge_kernels (see benchmarks/README.md).

Cases are (shape, T adapters, dtype[, layers]) from docs/ALGORITHM.md §6, built with
:mod:`robustmerge_kernels.demo.synthetic`. For each case the same session measures, in order:

* ``copy``        - every input tensor copied into a preallocated tensor (``dst.copy_(src)``,
                    one call per tensor): the memory-bandwidth yardstick for the merge;
* ``copy-flat``   - the same bytes copied as one flat buffer per adapter (pure bandwidth,
                    no per-tensor overhead);
* ``api-isfinite``- the NaN/Inf check ``merge()`` runs on every input before any backend
                    sees it (a floor on ``merge()`` time whatever the backend);
* every backend ``available_backends("cpu")`` reports as ``"ok"`` (``merge(..., backend=B)``).

Ratios are time ratios against the ``copy`` and ``reference`` rows of the *same case in the
same session* (never against stored results: these machines are noisy). They are written to
``benchmark.extra_info`` and, at session end, to a CSV under ``benchmarks/results/``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
BASELINES = ("copy", "copy-flat", "api-isfinite")
COPY_ROW, REFERENCE_ROW = "copy", "reference"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class BenchCase:
    shape: str
    T: int
    dtype: str  # key of _DTYPES
    layers: int | None = None  # None: all layers of the shape
    rank: int = 16
    min_rounds: int = 3  # of every measured row of this case
    max_rounds: int = 30  # of merge rows; baselines (cheap) may run up to BASELINE_MAX_ROUNDS

    @property
    def id(self) -> str:
        layers = f"-L{self.layers}" if self.layers else ""
        rank = f"-r{self.rank}" if self.rank != 16 else ""
        return f"{self.shape}{layers}-T{self.T}-{self.dtype}{rank}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


BASELINE_MAX_ROUNDS = 50

# A few minutes on a 2-core machine, everything included.
QUICK_CASES = (
    BenchCase("clip-vit-b32", 8, "fp32"),
    BenchCase("clip-vit-b32", 8, "bf16"),
    BenchCase("llava-7b", 8, "fp32", layers=2),
    BenchCase("llava-7b", 8, "bf16", layers=2),
)

# docs/ALGORITHM.md §6. llava-7b T=32 fp32 is 5.1 GB of input (plus 5.1 GB of copy outputs while
# the copy rows run), so the big cases run 2-3 rounds after one warm-up.
FULL_CASES = (
    BenchCase("clip-vit-b32", 8, "fp32"),
    BenchCase("clip-vit-b32", 8, "bf16"),
    *(BenchCase("llava-7b", T, dt, min_rounds=2, max_rounds=3) for T in (2, 8, 32) for dt in ("fp32", "bf16")),
)


def parse_case(text: str) -> BenchCase:
    """``shape:T[:dtype[:layers[:rank]]]``, e.g. ``llava-13b:8:bf16`` or ``llava-7b:32:fp32:4``."""
    from robustmerge_kernels.demo.synthetic import SHAPES

    parts = [p.strip() for p in text.split(":")]
    if len(parts) < 2 or parts[0] not in SHAPES:
        raise pytest.UsageError(f"bad case {text!r}: use shape:T[:dtype[:layers[:rank]]], shape in {list(SHAPES)}")
    try:
        T = int(parts[1])
        dtype = parts[2] if len(parts) > 2 and parts[2] else "fp32"
        layers = int(parts[3]) if len(parts) > 3 and parts[3] not in ("", "all") else None
        rank = int(parts[4]) if len(parts) > 4 else 16
    except ValueError as exc:
        raise pytest.UsageError(f"bad case {text!r}: {exc}") from None
    if dtype not in _DTYPES:
        raise pytest.UsageError(f"bad case {text!r}: dtype must be one of {list(_DTYPES)}")
    big = layers is None and SHAPES[parts[0]].hidden >= 4096
    return BenchCase(parts[0], T, dtype, layers, rank, *((2, 3) if big else ()))


def pytest_addoption(parser):
    group = parser.getgroup("robustmerge benchmarks")
    group.addoption(
        "--bench-full", action="store_true", default=None,
        help="run the full docs/ALGORITHM.md §6 case set (env RM_BENCH_FULL=1); default is the quick set",
    )  # fmt: skip
    group.addoption(
        "--bench-cases", default=None, metavar="SPEC[,SPEC...]",
        help="run these cases instead, shape:T[:dtype[:layers[:rank]]] (env RM_BENCH_CASES)",
    )  # fmt: skip
    group.addoption(
        "--bench-budget", type=float, default=None, metavar="SECONDS",
        help="target measuring time per row; rounds = budget / warm-up time, clamped (env RM_BENCH_BUDGET, default 3)",
    )  # fmt: skip
    group.addoption(
        "--bench-csv", default=None, metavar="PATH",
        help="where to write the session CSV (default benchmarks/results/<mode>-<timestamp>.csv)",
    )  # fmt: skip


def _selected(config) -> tuple[str, tuple[BenchCase, ...]]:
    spec = config.getoption("--bench-cases", None) or os.environ.get("RM_BENCH_CASES", "")
    if spec.strip():
        return "custom", tuple(parse_case(s) for s in spec.split(",") if s.strip())
    full = config.getoption("--bench-full", None)
    if full is None:
        full = os.environ.get("RM_BENCH_FULL", "").strip().lower() in _TRUE
    return ("full", FULL_CASES) if full else ("quick", QUICK_CASES)


def _budget(config) -> float:
    value = config.getoption("--bench-budget", None)
    if value is None:
        value = float(os.environ.get("RM_BENCH_BUDGET", "3"))
    return value


def cpu_backends() -> list[str]:
    from robustmerge_kernels import available_backends

    return [name for name, state in available_backends("cpu").items() if state == "ok"]


def pytest_configure(config):
    config._rm_bench = BenchSession(*_selected(config), budget=_budget(config))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    bs: BenchSession = metafunc.config._rm_bench
    # Module scope groups the tests by case, so one case's adapters are alive at a time.
    metafunc.parametrize("bench_case", bs.cases, ids=[c.id for c in bs.cases], scope="module")
    if "impl" in metafunc.fixturenames:
        # Baselines first: the ratios of later rows are computed against them as they run.
        impls = [*BASELINES, *sorted(cpu_backends(), key=lambda n: n != REFERENCE_ROW)]
        metafunc.parametrize("impl", impls)


# Keep a plain ``pytest`` at the repository root from wandering into minutes of benchmarks:
# they run only when a path inside benchmarks/ is named on the command line.
def pytest_ignore_collect(collection_path, config):
    if not collection_path.name.startswith("test_bench"):
        return None
    for arg in config.args:
        path = Path(str(arg).split("::", 1)[0])
        if not path.is_absolute():
            path = Path(config.invocation_params.dir) / path
        try:
            path.resolve().relative_to(BENCH_DIR)
            return None
        except ValueError:
            continue
    return True


# --------------------------------------------------------------------------- data


@dataclass
class CaseData:
    case: BenchCase
    adapters: list  # (state_dict, config) pairs, as merge() takes them
    tensors: list[torch.Tensor]  # every lora_A/lora_B tensor of every adapter
    flat: list[torch.Tensor]  # per adapter, its one contiguous uint8 buffer
    bytes_read: int  # bytes of all input A/B tensors (what merge() must read)
    seconds_to_generate: float


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture(scope="module")
def case_data(bench_case: BenchCase):
    from robustmerge_kernels.demo import synthetic

    one = synthetic.adapter_nbytes(bench_case.shape, bench_case.rank, bench_case.torch_dtype, bench_case.layers)
    need = 2 * bench_case.T * one + (1 << 30)  # inputs + copy outputs + 1 GiB for the merge itself
    avail = _mem_available()
    if avail is not None and need > avail:
        pytest.skip(f"{bench_case.id}: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
    start = time.perf_counter()
    adapters = synthetic.synthetic_adapters(
        bench_case.shape, bench_case.T, bench_case.rank, bench_case.torch_dtype,
        seed=0, layers=bench_case.layers, shared_buffer=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tensors = [x for sd, _ in adapters for x in sd.values()]
    flat = [torch.empty(0, dtype=torch.uint8).set_(next(iter(sd.values())).untyped_storage()) for sd, _ in adapters]
    nbytes = sum(x.nbytes for x in tensors)
    assert nbytes == sum(f.numel() for f in flat) == bench_case.T * one
    yield CaseData(bench_case, adapters, tensors, flat, nbytes, seconds)


# --------------------------------------------------------------------------- measuring


@dataclass
class Row:
    case: BenchCase
    impl: str
    bytes_read: int
    rounds: int
    median_s: float
    min_s: float
    spread: float  # interquartile range / median: how noisy this row was
    load1: float | None  # 1-minute load average when the row finished (others' work on the machine)
    paired_copy_ratio: float | None  # median over rounds of round time / a copy timed just before it
    extra_info: dict  # the benchmark's extra_info dict (same object pytest-benchmark saves)

    @property
    def gb_s(self) -> float:
        return self.bytes_read / self.median_s / 1e9


@dataclass
class BenchSession:
    mode: str
    cases: tuple[BenchCase, ...]
    budget: float
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    csv_path: Path | None = None

    def ratio(self, row: Row, baseline: str) -> float | None:
        base = self.rows.get((row.case.id, baseline))
        return row.median_s / base.median_s if base else None

    def annotate(self, row: Row) -> None:
        row.extra_info.update(
            gb_s=round(row.gb_s, 4),
            ratio_to_copy=_round(self.ratio(row, COPY_ROW)),
            ratio_to_reference=_round(self.ratio(row, REFERENCE_ROW)),
            ratio_to_copy_paired=_round(row.paired_copy_ratio),
        )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@pytest.fixture
def run_bench(benchmark, request, bench_case: BenchCase, case_data: CaseData, impl: str):
    """``run_bench(fn, paired_copy=None)``: warm up, pick rounds from the budget, measure, record.

    With ``paired_copy`` (the ``copy`` row's function), that copy is also timed (best of two,
    untimed by pytest-benchmark, in pedantic's per-round ``setup``) right before every round,
    giving a ratio to copy that shares each round's machine conditions.
    """
    bs: BenchSession = request.config._rm_bench

    def run(fn, paired_copy=None):
        benchmark.group = bench_case.id
        benchmark.extra_info.update(
            case=bench_case.id, impl=impl, shape=bench_case.shape, T=bench_case.T, dtype=bench_case.dtype,
            layers=bench_case.layers, rank=bench_case.rank, bytes_read=case_data.bytes_read,
            tensors=len(case_data.tensors), threads=torch.get_num_threads(), torch=torch.__version__,
        )  # fmt: skip
        if benchmark.disabled:  # --benchmark-disable: run once as a smoke test
            return benchmark.pedantic(fn)
        start = time.perf_counter()
        fn()  # warm-up (allocator, caches, lazy imports); also sizes the rounds
        warm = time.perf_counter() - start
        cap = bench_case.max_rounds if impl not in BASELINES else max(bench_case.max_rounds, BASELINE_MAX_ROUNDS)
        rounds = int(min(cap, max(bench_case.min_rounds, math.ceil(bs.budget / max(warm, 1e-9)))))
        copy_times: list[float] = []

        def setup():
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                paired_copy()
                best = min(best, time.perf_counter() - t0)
            copy_times.append(best)

        setup_fn = setup if paired_copy is not None else None
        result = benchmark.pedantic(fn, setup=setup_fn, rounds=rounds, iterations=1, warmup_rounds=0)
        stats = benchmark.stats.stats
        paired = None
        if copy_times and len(copy_times) == len(stats.data):
            paired = statistics.median(t / c for t, c in zip(stats.data, copy_times))
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        spread = stats.iqr / stats.median if stats.median > 0 else math.nan
        row = Row(
            bench_case, impl, case_data.bytes_read, rounds, stats.median, stats.min, spread, load1, paired,
            benchmark.extra_info,
        )  # fmt: skip
        bs.rows[(bench_case.id, impl)] = row
        benchmark.extra_info.update(rounds=rounds, spread=round(spread, 4), load1=load1)
        bs.annotate(row)
        return result

    return run


# --------------------------------------------------------------------------- reporting

CSV_COLUMNS = (
    "case", "backend", "median_s", "gb_s", "ratio_to_copy", "ratio_to_reference", "ratio_to_copy_paired",
    "min_s", "spread", "rounds", "load1", "bytes_read", "shape", "T", "dtype", "layers", "rank", "threads",
    "device", "cpu_simd", "commit", "date",
)  # fmt: skip


def _cpu_simd() -> str:
    """The CPU backend's SIMD path in this session (avx512, avx2, portable; $ROBUSTMERGE_SIMD forces one)."""
    try:
        from robustmerge_kernels.backends.cpu import simd_path

        return simd_path()
    except Exception:  # extension not built, or a forced path this CPU lacks: no cpu rows either
        return ""


def _provenance() -> tuple[str, str, str]:
    """(device, commit, date) so a committed CSV says what it measured and when."""
    import platform
    import subprocess

    device = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            device = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f"{device} ({os.cpu_count()} cpus)"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS_DIR.parent, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=RESULTS_DIR.parent, timeout=10,
        ).stdout.strip()  # fmt: skip
        commit = f"{commit}{'+dirty' if dirty else ''}" or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return device, commit, _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


# A wrapper, outermost: pytest-benchmark saves its JSON in a (plain) hook wrapper, so the
# final ratios must be in extra_info before that runs.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    _finish_session(session)
    return (yield)


def _finish_session(session) -> None:
    bs: BenchSession | None = getattr(session.config, "_rm_bench", None)
    if bs is None or not bs.rows:
        return
    for row in bs.rows.values():
        bs.annotate(row)
    option = session.config.getoption("--bench-csv", None)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(option) if option else RESULTS_DIR / f"{bs.mode}-{stamp}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    order = {c.id: i for i, c in enumerate(bs.cases)}
    device, commit, date = _provenance()
    provenance = (device, _cpu_simd(), commit, date)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for row in sorted(bs.rows.values(), key=lambda r: order.get(r.case.id, 1 << 30)):
            c = row.case
            w.writerow([
                c.id, row.impl, f"{row.median_s:.6g}", f"{row.gb_s:.4g}",
                _fmt(bs.ratio(row, COPY_ROW)), _fmt(bs.ratio(row, REFERENCE_ROW)), _fmt(row.paired_copy_ratio),
                f"{row.min_s:.6g}", f"{row.spread:.3g}", row.rounds, _fmt(row.load1), row.bytes_read,
                c.shape, c.T, c.dtype, c.layers or "", c.rank, row.extra_info.get("threads", ""), *provenance,
            ])  # fmt: skip
    bs.csv_path = path


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def pytest_terminal_summary(terminalreporter, config):
    bs: BenchSession | None = getattr(config, "_rm_bench", None)
    if bs is None or not bs.rows:
        return
    tr = terminalreporter
    tr.section(f"robustmerge benchmarks ({bs.mode}, {torch.get_num_threads()} threads, same-session ratios)")
    tr.write_line(
        f"{'case':<28} {'backend':<14} {'median':>10} {'GB/s':>8} {'x copy':>8} {'x reference':>12} "
        f"{'x copy*':>8} {'rounds':>6} {'spread':>6} {'load':>5}"
    )
    for row in bs.rows.values():
        rc, rr = bs.ratio(row, COPY_ROW), bs.ratio(row, REFERENCE_ROW)
        tr.write_line(
            f"{row.case.id:<28} {row.impl:<14} {_fmt_time(row.median_s):>10} {row.gb_s:>8.2f} "
            f"{_fmt(rc):>8} {_fmt(rr):>12} {_fmt(row.paired_copy_ratio):>8} {row.rounds:>6} "
            f"{row.spread:>6.2f} {_fmt(row.load1):>5}"
        )
    tr.write_line("x copy / x reference: median time of the row / median time of that case's copy / reference row")
    tr.write_line("x copy*: median over rounds of (round time / a copy timed just before that round)")
    tr.write_line("spread: interquartile range / median of the rounds; load: 1-min load average (2 = both cores busy)")
    if bs.csv_path:
        tr.write_line(f"CSV: {bs.csv_path}")


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"
