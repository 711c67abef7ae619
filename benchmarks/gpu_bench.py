#!/usr/bin/env python
"""GPU benchmark: every GPU backend next to the reference and a device-to-device copy.

One command on a machine with a CUDA GPU:

    python benchmarks/gpu_bench.py                      # llava-7b T=8, 32 x bf16, fp32
    python benchmarks/gpu_bench.py --cases llava-7b:8:bf16,clip-vit-b32:8:fp32 --rounds 10
    python benchmarks/gpu_bench.py --out benchmarks/results/gpu-h100.csv

For each case (shape:T:dtype[:layers], docs/ALGORITHM.md §6 shapes, rank 16) synthetic adapters
are made directly on the GPU with the distributions of robustmerge_kernels.demo.synthetic
(A uniform at Kaiming-uniform scale, B Gaussian std 0.01; the values come from a CUDA
generator, so they differ from the CPU-generated ones, not their distribution). Each
adapter's tensors are views into one buffer. Rows (warm-up calls first, then --rounds
timed calls, median reported):

  copy-flat     THE YARDSTICK: the same bytes copied as one flat buffer per adapter
                (T launches: device bandwidth, read + write);
  read-flat     a read-only reduction (amax) over the same flat buffers: the floor of any
                merge, which reads every input byte once and writes 1/T of it;
  copy          every input tensor copied separately (3,584 launches for llava-7b T = 8:
                launch-bound, so it flatters slow kernels; kept for comparison only);
  <backend>     rk.merge(adapters, backend=<backend>) end to end (CUDA events around the
                call: host work included), for "reference" and every "ok" GPU backend;
  <backend>:call    the backend's robustmerge() alone on the plan as one pre-built group
                (what merge() hands a backend for CUDA-resident inputs), CUDA events;
  <backend>:gpu     GPU time of one such call: the sum of its kernels, memsets and copies
                from torch.profiler (no host time, no launch gaps) -- the kernel figure
                the targets in benchmarks/README.md are about.
  cuda:gpu-split-all    the same for the cuda backend with the split selection forced on
                every matrix (RMK_CUDA_SPLIT_ELEMS=0): the split path's cost against the
                one-block path on a plan of many matrices (benchmarks/README.md).

GB/s counts the input bytes read once (bytes of all lora_A and lora_B). ratio_to_flat_copy
= median / median(copy-flat) of the same case. A CSV with the GPU name, commit and date in
every row goes to --out (default benchmarks/results/gpu-<gpu>-<timestamp>.csv). Without a
CUDA GPU it exits with status 2 (--cpu-dry-run checks the script on CPU tensors).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_CASES = "llava-7b:8:bf16,llava-7b:8:fp32,llava-7b:32:bf16,llava-7b:32:fp32"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FIELDS = ["case", "impl", "median_s", "min_s", "rounds", "gb_s", "ratio_to_flat_copy", "speedup_vs_reference",
          "max_abs_diff_vs_reference", "bytes_read", "shape", "T", "dtype", "layers", "rank", "gpu", "torch", "triton",
          "commit", "date"]  # fmt: skip


@dataclass(frozen=True)
class Case:
    shape: str
    T: int
    dtype: str
    layers: int | None = None
    rank: int = 16

    @property
    def id(self) -> str:
        return f"{self.shape}{f'-L{self.layers}' if self.layers else ''}-T{self.T}-{self.dtype}"


def parse_cases(text: str) -> list[Case]:
    cases = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if not 2 <= len(fields) <= 4 or (len(fields) > 2 and fields[2] not in DTYPES):
            raise SystemExit(f"bad case {part!r}: expected shape:T[:fp32|bf16|fp16[:layers]]")
        layers = int(fields[3]) if len(fields) == 4 and fields[3] != "all" else None
        cases.append(Case(fields[0], int(fields[1]), fields[2] if len(fields) > 2 else "fp32", layers))
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"comma-separated shape:T:dtype[:layers] (default {DEFAULT_CASES})"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed calls per row after the warm-up (default 5)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per row first (default 1; triton compiles here)"
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to time (default: reference + every 'ok' GPU backend)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the reference backend (slow for T=32)")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/gpu-<gpu>-<timestamp>.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="check this script without a GPU: CPU tensors and backends, wall-clock timing (tiny cases only)",
    )
    return p.parse_args(argv)


def provenance() -> tuple[str, str]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit, _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


def make_adapters(case: Case, device, seed: int):
    """T synthetic adapters as (state_dict, config) pairs, each carved from one GPU buffer."""
    import torch

    from robustmerge_kernels.demo import synthetic

    dtype = getattr(torch, DTYPES[case.dtype])
    mods = synthetic.module_list(case.shape, case.layers)
    config = synthetic.lora_config(case.shape, case.rank)
    size = sum(case.rank * (n + m) for _, n, m in mods)
    adapters, flats = [], []
    for t in range(case.T):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + t)
        buf = torch.empty(size, dtype=dtype, device=device)
        state, offset = {}, 0
        for prefix, n, m in mods:
            a = buf[offset : offset + case.rank * n].view(case.rank, n)
            offset += case.rank * n
            b = buf[offset : offset + m * case.rank].view(m, case.rank)
            offset += m * case.rank
            bound = 1.0 / math.sqrt(n)
            state[f"{prefix}.lora_A.weight"] = a.uniform_(-bound, bound, generator=g)
            state[f"{prefix}.lora_B.weight"] = b.normal_(0.0, 0.01, generator=g)
        adapters.append((state, config))
        flats.append(buf)
    return adapters, flats, mods


def module_groups(adapters, mods, rank, out_dtype, group_bytes):
    """ModuleInputs groups of about group_bytes, as merge() hands them to a backend."""
    from robustmerge_kernels.backends import ModuleInputs
    from robustmerge_kernels.plan import ModulePlan

    T = len(adapters)
    groups, group, size = [], [], 0
    for prefix, n, m in mods:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        a = [sd[a_key] for sd, _ in adapters]
        b = [sd[b_key] for sd, _ in adapters]
        nbytes = sum(x.numel() * x.element_size() for x in (*a, *b))
        plan = ModulePlan(name=prefix, a_key=a_key, b_key=b_key, rank=rank, in_features=n, out_features=m,
                          members=tuple(range(T)), a_keys=(a_key,) * T, b_keys=(b_key,) * T, b_scale=(1.0,) * T,
                          out_dtype=out_dtype, nbytes_in=nbytes)  # fmt: skip
        if group and size + nbytes > group_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(ModuleInputs(plan, a, b))
        size += nbytes
    if group:
        groups.append(group)
    return groups


def copier(sources):
    """dst.copy_(src) for every source, into preallocated destinations."""
    import torch

    pairs = [(torch.empty_like(x), x) for x in sources]

    def run():
        for dst, src in pairs:
            dst.copy_(src)

    return run


def reader(sources):
    """A read-only pass over every source (amax: reads each byte once, writes a scalar)."""
    import torch

    def run():
        return [torch.amax(x) for x in sources]

    return run


def gpu_time(fn, rounds: int) -> list[float]:
    """Seconds of GPU work per call of fn: the sum of the device time of every kernel,
    memset and copy the profiler records (empty without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    from torch.profiler import ProfilerActivity, profile

    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        times.append(total_us / 1e6)
    return times


def timer(fn, rounds: int, warmup: int) -> tuple[list[float], object]:
    """Seconds per call from CUDA events (wall clock when no GPU is in use: --cpu-dry-run)."""
    import time

    import torch

    if not torch.cuda.is_available():
        out = None
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return times, out

    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times, out


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = parse_cases(args.cases)
    import torch

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA GPU is available (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(ROOT))
    import robustmerge_kernels as rk
    from robustmerge_kernels.backends import available_backends, get_backend
    from robustmerge_kernels.params import RobustMergeParams

    params = RobustMergeParams()  # the defaults merge() uses

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""

    device = torch.device("cpu" if dry else "cuda")
    gpu = "cpu-dry-run" if dry else torch.cuda.get_device_name(device)
    status = available_backends(device.type)
    print(f"GPU: {gpu}; backends for {device.type} tensors: " + ", ".join(f"{k}: {v}" for k, v in status.items()))
    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        names = ([] if args.no_reference else ["reference"]) + [
            n for n, s in status.items() if s == "ok" and n != "reference"
        ]
    commit, date = provenance()
    out = (
        Path(args.out)
        if args.out
        else RESULTS_DIR / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}-{date.replace(':', '')}.csv"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        if not dry:
            torch.cuda.empty_cache()
        adapters, flats, mods = make_adapters(case, device, args.seed)
        tensors = [x for sd, _ in adapters for x in sd.values()]
        nbytes = sum(x.numel() * x.element_size() for x in tensors)
        results: dict[str, tuple[list[float], str]] = {}

        results["copy-flat"] = (timer(copier(flats), args.rounds, args.warmup)[0], "")
        results["read-flat"] = (timer(reader(flats), args.rounds, args.warmup)[0], "")
        results["copy"] = (timer(copier(tensors), args.rounds, args.warmup)[0], "")
        if not dry:
            torch.cuda.empty_cache()

        reference_out = None
        for name in names:
            try:
                get_backend(name, device.type)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
                print(f"  {case.id} {name}: skipped ({exc})")
                continue
            out_dtype = getattr(torch, DTYPES[case.dtype])  # as the kernel-only groups below, and the recorded results
            times, merged = timer(lambda: rk.merge(adapters, backend=name, dtype=out_dtype), args.rounds, args.warmup)  # noqa: B023
            diff = ""
            if name == "reference":
                reference_out = merged
            elif reference_out is not None:
                diff = max(float((merged[k].double() - reference_out[k].double()).abs().max()) for k in reference_out)
            results[name] = (times, diff)
            del merged
            if name != "reference":
                impl = get_backend(name, device.type)
                # One group for the whole plan, as merge() makes for CUDA-resident inputs.
                (group,) = module_groups(adapters, mods, case.rank, getattr(torch, DTYPES[case.dtype]), 1 << 62)

                def call(impl=impl, group=group):
                    return impl.robustmerge(group, params)

                results[f"{name}:call"] = (timer(call, args.rounds, args.warmup)[0], "")
                device_times = gpu_time(call, args.rounds)
                if device_times:
                    results[f"{name}:gpu"] = (device_times, "")
                if name == "cuda" and device_times:
                    from robustmerge_kernels.backends.cuda import CudaBackend

                    split_all = CudaBackend(split_elems=0)

                    def call_split(impl=split_all, group=group):
                        return impl.robustmerge(group, params)

                    results["cuda:gpu-split-all"] = (gpu_time(call_split, args.rounds), "")
            if not dry:
                torch.cuda.empty_cache()
        reference_out = None

        copy_med = statistics.median(results["copy-flat"][0])
        ref_med = statistics.median(results["reference"][0]) if "reference" in results else None
        print(f"\n{case.id}: {nbytes / 1e9:.2f} GB of input on {gpu}")
        print(f"  {'impl':<18} {'median':>10} {'GB/s':>8} {'/flat copy':>10} {'speed-up':>9}")
        for impl_name, (times, diff) in results.items():
            med = statistics.median(times)
            speedup = ref_med / med if ref_med and impl_name not in ("copy", "copy-flat", "read-flat") else None
            print(f"  {impl_name:<18} {med * 1e3:>8.2f}ms {nbytes / med / 1e9:>8.1f} {med / copy_med:>9.2f}x "
                  f"{f'{speedup:.1f}x' if speedup else '':>9}")  # fmt: skip
            rows.append({
                "case": case.id, "impl": impl_name, "median_s": f"{med:.6g}", "min_s": f"{min(times):.6g}",
                "rounds": len(times), "gb_s": f"{nbytes / med / 1e9:.2f}", "ratio_to_flat_copy": f"{med / copy_med:.4g}",
                "speedup_vs_reference": f"{speedup:.4g}" if speedup else "",
                "max_abs_diff_vs_reference": f"{diff:.3g}" if diff != "" else "", "bytes_read": nbytes,
                "shape": case.shape, "T": case.T, "dtype": case.dtype, "layers": case.layers or "", "rank": case.rank,
                "gpu": gpu, "torch": torch.__version__, "triton": triton_version, "commit": commit, "date": date,
            })  # fmt: skip
        adapters = flats = tensors = None  # free this case's inputs before the next is made
        with open(out, "w", newline="") as f:  # rewritten after every case: partial results survive a crash
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
