"""Time ``analyze`` on llava-7b-shaped synthetic adapters (224 modules, r = 16), T tasks + merges.

    python benchmarks/bench_analyze.py [--tasks 8] [--threads 2] [--merged robustmerge task_arithmetic]

Prints the seconds of analyze() alone (inputs generated and merged first, in memory) and
writes the report to --out if given. The issue's bar: T = 8 in under 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import torch

import robustmerge_kernels as rk
from robustmerge_kernels.demo.synthetic import synthetic_adapters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default: all 32)")
    p.add_argument("--merged", nargs="*", default=["robustmerge"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks = synthetic_adapters("llava-7b", args.tasks, rank=16, layers=args.layers)
    merged = [rk.merge(tasks, method=m) for m in args.merged]
    start = time.perf_counter()
    result = rk.analyze(tasks, [(dict(m), m.config) for m in merged], merged_labels=args.merged)
    seconds = time.perf_counter() - start
    print(f"analyze: llava-7b T={args.tasks}, {len(result.data['modules'])} modules, {len(merged)} merged, "
          f"{args.threads} threads: {seconds:.1f} s")  # fmt: skip
    if args.out:
        start = time.perf_counter()
        result.write(args.out)
        print(f"report written to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
