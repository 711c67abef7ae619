"""Folders in, adapter out: how much the work around the kernel costs, in one run.

    python benchmarks/files_pipeline.py --shape llava-7b --T 8 --dtype fp32 [--reps 3]

Writes T synthetic PEFT folders (from a child process), then times, alternating the
variants in each repetition so machine noise hits them alike:
  read       reading every input file once (what `cat` costs, page cache hot)
  memory     merge() of the same adapters already in memory (state dicts), no output
  files      merge() from the folders, output written, inputs hashed (the CLI's path)
  files-seq  the same with ROBUSTMERGE_PREFETCH=0 (the next group is not read ahead)
and prints one JSON line per variant with the median seconds, the ratios the issue
targets (files / memory, files / read) and process CPU seconds. Linux only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io.sources import open_adapter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak_memory import _write_folders as _write_folders_layers  # noqa: E402  (shape, T, dtype, layers, root)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _write_folders(shape: str, T: int, dtype: str, root: str) -> None:
    _write_folders_layers(shape, T, dtype, None, root)


def _read_all(folders: list[str]) -> None:
    buf = bytearray(16 << 20)
    for folder in folders:
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llava-7b")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="rm-files-bench-") as root:
        child = multiprocessing.get_context("spawn").Process(
            target=_write_folders, args=(args.shape, args.T, args.dtype, root)
        )
        child.start()
        child.join()
        folders = sorted(os.path.join(root, d) for d in os.listdir(root))
        pairs = []
        for i, folder in enumerate(folders):
            src = open_adapter(folder, i)
            pairs.append(({k: src.get(k) for k in src.keys()}, src.config))
            src.close()

        def files(out: str) -> None:
            rk.merge(folders, out=out, keep_in_memory=False, overwrite=True)

        def files_seq(out: str) -> None:
            os.environ["ROBUSTMERGE_PREFETCH"] = "0"
            try:
                files(out)
            finally:
                del os.environ["ROBUSTMERGE_PREFETCH"]

        variants = {
            "read": lambda out: _read_all(folders),
            "memory": lambda out: rk.merge(pairs),
            "files": files,
            "files-seq": files_seq,
        }
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        files(os.path.join(root, "merged"))  # warm-up: page cache, allocator, extension, hash memory
        for _ in range(args.reps):
            for name, fn in variants.items():
                c0, t0 = _cpu_seconds(), time.perf_counter()
                fn(os.path.join(root, "merged"))
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu_seconds() - c0)
        med = {k: statistics.median(v) for k, v in wall.items()}
        for name in variants:
            print(
                json.dumps(
                    {
                        "case": f"{args.shape} T={args.T} {args.dtype}",
                        "variant": name,
                        "seconds": round(med[name], 3),
                        "cpu_seconds": round(statistics.median(cpu[name]), 3),
                        "vs_memory": round(med[name] / med["memory"], 2),
                        "vs_read": round(med[name] / med["read"], 2),
                        "reps": args.reps,
                        "cpu": platform.processor() or platform.machine(),
                        "threads": os.environ.get("ROBUSTMERGE_NUM_THREADS", str(torch.get_num_threads())),
                    }
                )
            )


if __name__ == "__main__":
    main()
