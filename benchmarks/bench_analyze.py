"""Time ``analyze`` on llava-7b-shaped synthetic adapters (224 modules, r = 16), T tasks + merges.

    python benchmarks/bench_analyze.py [--tasks 8] [--merged robustmerge task_arithmetic] [--repeat 3]

Prints the seconds of analyze() alone (inputs generated and merged first, in memory; the
median of --repeat runs) and writes the report to --out if given. analyze() runs on one
torch thread whatever the caller's setting (see analysis/core.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import robustmerge_kernels as rk
from robustmerge_kernels.demo.synthetic import synthetic_adapters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default: all 32)")
    p.add_argument("--merged", nargs="*", default=["robustmerge"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tasks = synthetic_adapters("llava-7b", args.tasks, rank=16, layers=args.layers)
    merged = [rk.merge(tasks, method=m) for m in args.merged]
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = rk.analyze(tasks, [(dict(m), m.config) for m in merged], merged_labels=args.merged)
        times.append(time.perf_counter() - start)
    print(f"analyze: llava-7b T={args.tasks}, {len(result.data['modules'])} modules, {len(merged)} merged: "
          f"median {statistics.median(times):.1f} s of {', '.join(f'{t:.1f}' for t in times)}")  # fmt: skip
    if args.out:
        start = time.perf_counter()
        result.write(args.out)
        print(f"report written to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
