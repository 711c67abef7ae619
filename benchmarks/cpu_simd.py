"""CPU backend per SIMD path vs. a flat copy of the same bytes, all in one process.

    ROBUSTMERGE_NUM_THREADS=2 python benchmarks/cpu_simd.py llava-7b:8:fp32 llava-7b:8:bf16 \
        llava-7b:32:fp32 --rounds 5 --csv benchmarks/results/cpu-simd-<date>.csv

For each case the rounds interleave every row (copy-flat, then merge() forced to each SIMD
path the CPU supports, via _cpu.set_simd_path), so machine noise hits all rows alike; each
row's median over rounds is divided by the copy's median (same run). ``kernel_s`` is the
part of a merge() spent inside the C++ kernel calls (the rest is planning, tables and
output allocation in Python). ``cpu_s`` is the process CPU time of a round (all threads):
on a shared machine, waiting for a core inflates wall time but not CPU time, so
``cpu_ratio_to_copy_flat`` is the steadier ratio when the load average exceeds the cores.
The merged outputs of every path are checked byte-identical. Cases are ``shape:T[:dtype[:layers]]`` as in the
pytest harness (conftest.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robustmerge_kernels  # noqa: E402
from robustmerge_kernels import _cpu  # noqa: E402
from robustmerge_kernels.backends.cpu import get_num_threads  # noqa: E402
from robustmerge_kernels.demo import synthetic  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ("case", "row", "simd", "median_s", "min_s", "ratio_to_copy_flat", "kernel_s", "kernel_ratio_to_copy_flat",
           "cpu_s", "cpu_ratio_to_copy_flat", "gb_s", "rounds", "threads", "bytes_read",
           "cpu", "cpu_simd_level", "load1", "date")  # fmt: skip


def cpu_description() -> tuple[str, str]:
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    level = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return f"{name} ({os.cpu_count()} cpus)", level


class KernelTimer:
    """Wraps _cpu.robustmerge (what the CPU backend calls) to sum the time spent inside it."""

    def __init__(self):
        self.inner, self.seconds = _cpu.robustmerge, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def run_case(spec: str, rounds: int, paths: list[str]) -> list[dict]:
    parts = spec.split(":")
    shape, T = parts[0], int(parts[1])
    dtype = parts[2] if len(parts) > 2 else "fp32"
    layers = int(parts[3]) if len(parts) > 3 else None
    adapters = synthetic.synthetic_adapters(shape, T, 16, _DTYPES[dtype], seed=0, layers=layers, shared_buffer=True)
    flat = [torch.empty(0, dtype=torch.uint8).set_(next(iter(sd.values())).untyped_storage()) for sd, _ in adapters]
    nbytes = sum(f.numel() for f in flat)
    dst = [torch.empty_like(f) for f in flat]

    def copy_flat():
        for d, s in zip(dst, flat):
            d.copy_(s)

    def merge_with(path):
        def run():
            _cpu.set_simd_path(path)
            # output in the input dtype, as the tables in README were measured (fp16/bf16 inputs
            # default to fp32 output since the official-pipeline change)
            return robustmerge_kernels.merge(adapters, backend="cpu", dtype=_DTYPES[dtype])

        return run

    rows = {"copy-flat": copy_flat, **{f"cpu-{p}": merge_with(p) for p in paths}}
    times: dict[str, list[float]] = {name: [] for name in rows}
    kernel: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    timer = KernelTimer()
    _cpu.robustmerge = timer
    reference = None
    for name, fn in rows.items():  # warm-up, and the bit-identity check across paths
        out = fn()
        if name.startswith("cpu-"):
            flat_out = torch.cat([t.reshape(-1).view(torch.uint8) for t in out.values()])
            if reference is None:
                reference = flat_out
            elif not torch.equal(reference, flat_out):
                raise SystemExit(f"{spec}: {name} output differs from {paths[0]}'s")
        del out
    for _ in range(rounds):
        for name, fn in rows.items():
            timer.seconds = 0.0
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            kernel[name].append(timer.seconds)
            del out
    _cpu.robustmerge = timer.inner
    _cpu.set_simd_path("auto")
    copy_median = statistics.median(times["copy-flat"])
    copy_cpu = statistics.median(cpu["copy-flat"])
    result = []
    for name, ts in times.items():
        med = statistics.median(ts)
        kmed = statistics.median(kernel[name]) if name.startswith("cpu-") else None
        result.append(dict(
            case=f"{shape}{f'-L{layers}' if layers else ''}-T{T}-{dtype}", row=name,
            simd=name[4:] if name.startswith("cpu-") else "", median_s=f"{med:.4f}", min_s=f"{min(ts):.4f}",
            ratio_to_copy_flat=f"{med / copy_median:.3f}", kernel_s="" if kmed is None else f"{kmed:.4f}",
            kernel_ratio_to_copy_flat="" if kmed is None else f"{kmed / copy_median:.3f}",
            cpu_s=f"{statistics.median(cpu[name]):.4f}",
            cpu_ratio_to_copy_flat=f"{statistics.median(cpu[name]) / copy_cpu:.3f}", gb_s=f"{nbytes / med / 1e9:.2f}", rounds=rounds,
            threads=get_num_threads(), bytes_read=nbytes, load1=f"{os.getloadavg()[0]:.2f}",
        ))  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="shape:T[:dtype[:layers]], e.g. llava-7b:8:bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paths", default=None, help="comma-separated SIMD paths (default: every one this CPU supports)")
    ap.add_argument("--csv", default=None, help="append the rows to this CSV")
    args = ap.parse_args()
    paths = args.paths.split(",") if args.paths else [p for p, ok in _cpu.simd_paths().items() if ok]
    cpu, level = cpu_description()
    date = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    print(f"{cpu}, SIMD level {level}, {get_num_threads()} threads")
    print(
        f"{'case':<22} {'row':<14} {'median':>9} {'x copy':>7} {'kernel':>9} {'x copy':>7} {'cpu x copy':>10} "
        f"{'GB/s':>6}"
    )
    all_rows = []
    for spec in args.cases:
        for row in run_case(spec, args.rounds, paths):
            row.update(cpu=cpu, cpu_simd_level=level, date=date)
            all_rows.append(row)
            kernel = f"{float(row['kernel_s']) * 1e3:>7.1f}ms" if row["kernel_s"] else ""
            print(f"{row['case']:<22} {row['row']:<14} {float(row['median_s']) * 1e3:>7.1f}ms "
                  f"{row['ratio_to_copy_flat']:>7} {kernel:>9} {row['kernel_ratio_to_copy_flat']:>7} "
                  f"{row['cpu_ratio_to_copy_flat']:>10} {row['gb_s']:>6}",
                  flush=True)  # fmt: skip
    if args.csv and Path(args.csv).exists():
        with open(args.csv) as f:
            if next(csv.reader(f), None) != list(COLUMNS):
                raise SystemExit(f"{args.csv}: has other columns; append to a CSV of this script's version only")
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(all_rows)


if __name__ == "__main__":
    main()
