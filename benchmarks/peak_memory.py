"""Peak extra memory of one merge, measured with the kernel's own peak-RSS counter.

    python benchmarks/peak_memory.py --shape llava-7b --T 8 --dtype fp32 --backend cpu [--from-disk]

The process builds the adapters (in memory, or saved as PEFT folders and read back with
--from-disk), resets VmHWM through /proc/self/clear_refs, merges, and reports the peak
RSS above what it held before the merge, next to the output's size and the largest
module's working set (its T inputs) so the bound "output + a working set per thread"
can be checked. Linux only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import tempfile

import torch

import robustmerge_kernels as rk
from robustmerge_kernels.backends import cpu as cpu_backend
from robustmerge_kernels.demo import synthetic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _write_folders(shape: str, T: int, dtype: str, layers: int | None, root: str) -> None:
    from safetensors.torch import save_file

    for i, (sd, config) in enumerate(synthetic.synthetic_adapters(shape, T, dtype=DTYPES[dtype], layers=layers)):
        folder = os.path.join(root, f"a{i:04d}")
        os.makedirs(folder)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llava-7b")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--from-disk", action="store_true", help="merge PEFT folders (safetensors) instead of dicts")
    p.add_argument("--group-mb", type=int, default=None, help="input MB per backend call (default: the library's)")
    args = p.parse_args()

    module_bytes = max(
        args.T * 16 * (n + m) * DTYPES[args.dtype].itemsize
        for _, n, m in synthetic.module_list(args.shape, args.layers)
    )
    tmp = None
    if args.from_disk:
        # Write the folders from a child process: freed tensors would otherwise stay in
        # this process's heap and hide the merge's own allocations from the measurement.
        tmp = tempfile.TemporaryDirectory(prefix="rm-peak-")
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_write_folders, args=(args.shape, args.T, args.dtype, args.layers, tmp.name))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit("writing the adapter folders failed")
        adapters = sorted(os.path.join(tmp.name, d) for d in os.listdir(tmp.name))
    else:
        adapters = synthetic.synthetic_adapters(args.shape, args.T, dtype=DTYPES[args.dtype], layers=args.layers)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    merged = rk.merge(adapters, backend=args.backend, group_bytes=args.group_mb and args.group_mb << 20)
    peak = _status_kib("VmHWM")
    out_bytes = sum(v.numel() * v.element_size() for v in merged.values())
    extra = (peak - before) * 1024
    print(json.dumps({
        "case": f"{args.shape}-T{args.T}-{args.dtype}", "backend": merged.report.backend, "from_disk": args.from_disk,
        "threads": cpu_backend.get_num_threads(), "input_MB": round(merged.report.bytes_in / 1e6, 1),
        "output_MB": round(out_bytes / 1e6, 1), "peak_extra_MB": round(extra / 1e6, 1),
        "peak_extra_minus_output_MB": round((extra - out_bytes) / 1e6, 1),
        "largest_module_working_set_MB": round(module_bytes / 1e6, 1), "seconds": round(merged.report.seconds, 3),
    }))  # fmt: skip
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
