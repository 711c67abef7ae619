"""Wall time of `torchrun --nproc-per-node N -m robustmerge_kernels merge` for several N.

    python benchmarks/distributed_merge.py --shape llava-7b --T 8 --dtype fp32 [--layers 8] [--ranks 1,2]

Writes T synthetic PEFT folders (from a child process), reads them once (page cache hot,
the yardstick), then merges them to one output with each rank count in turn (CPU, gloo;
ROBUSTMERGE_NUM_THREADS = cores / ranks), checks the outputs are byte-identical, and prints
one JSON line per rank count: seconds, input GB, GB/s and the ratio to reading the files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from files_pipeline import _read_all, _write_folders_layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llava-7b")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--ranks", default="1,2")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="rm-dist-bench-") as root:
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_write_folders_layers, args=(args.shape, args.T, args.dtype, args.layers, root))
        child.start()
        child.join()
        folders = sorted(os.path.join(root, d) for d in os.listdir(root))
        nbytes = sum(os.path.getsize(os.path.join(f, "adapter_model.safetensors")) for f in folders)
        _read_all(folders)
        t0 = time.perf_counter()
        _read_all(folders)
        read_s = time.perf_counter() - t0
        outputs = {}
        for n in (int(x) for x in args.ranks.split(",")):
            out = os.path.join(root, f"merged-{n}")
            env = dict(os.environ, OMP_NUM_THREADS="1", ROBUSTMERGE_NUM_THREADS=str(max(1, cores // n)))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "robustmerge_kernels", "merge", *folders, "-o", out, "-q"]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            seconds = time.perf_counter() - t0
            with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
                outputs[n] = f.read()
            print(
                json.dumps(
                    {
                        "case": f"{args.shape} T={args.T} {args.dtype} layers={args.layers or 'all'}",
                        "ranks": n,
                        "seconds": round(seconds, 2),
                        "input_gb": round(nbytes / 1e9, 3),
                        "gb_per_s": round(nbytes / 1e9 / seconds, 2),
                        "vs_read": round(seconds / read_s, 1),
                        "identical_to_first": outputs[n] == next(iter(outputs.values())),
                        "note": "wall time includes starting torch in each rank",
                    }
                )
            )


if __name__ == "__main__":
    main()
