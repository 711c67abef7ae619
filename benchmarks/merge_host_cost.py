#!/usr/bin/env python
"""Python host cost of ``merge()`` on in-memory state dicts, measurable without a GPU.

A merge of CUDA-resident inputs should cost little more than its kernels (issue 12: within
1 ms of them for llava-7b, T = 8). This measures everything else a ``merge()`` does on the
host, on CPU tensors: options, opening the state dicts (``open_adapter``), planning
(``build_plan``), loading and emitting each group (``RobustMergeRun.produce``) and the
report. The kernels are replaced by the ``hostonly`` backend registered here (never in
the package's registry): it builds the plan tables and allocates the outputs as the
compiled backends do (``backends/tables.py``), then returns the outputs uncomputed.

    python benchmarks/merge_host_cost.py                     # llava-7b, T = 8, bf16
    python benchmarks/merge_host_cost.py --T 32 --rounds 31 --groups cpu

``--groups cuda`` (default) puts the whole plan in one group, as merge() does for
CUDA-resident inputs; ``--groups cpu`` uses the in-memory CPU default (256 MB groups).
``--partial`` drops one module from the last adapter, so the plan cannot take its
uniform-adapters shortcut and checks every (module, adapter) pair.
Figures are CPU-time medians (time.process_time, so waiting for a core on a shared machine
does not count); ``yardstick_ms`` is ``sum(range(10**6))`` timed in the same run, to
compare machines and loads. These are host (Python) costs on this CPU, not GPU figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from host_cost import DTYPES, case_parser, median_ms, print_row  # this folder is on sys.path

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io.sources import open_adapter
from robustmerge_kernels.backends import register_backend, tables
from robustmerge_kernels.backends.base import KernelBackend
from robustmerge_kernels.demo import synthetic
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.pipeline import CUDA_RESIDENT_GROUP_BYTES, Emitter, RobustMergeRun, module_groups
from robustmerge_kernels.plan import build_plan

HOSTONLY = "hostonly"


class HostOnlyBackend(KernelBackend):
    """A compiled backend minus its kernels: the tables and outputs are built, nothing is
    computed (the outputs hold whatever torch.empty gave). For host-cost measurements only."""

    name = HOSTONLY

    def _run_kernel(self, group, params, details):
        t = tables.build_tables(group, params, group[0].a[0].device)
        return t.outputs, None


def register_hostonly() -> None:
    # priority -1: never chosen by backend="auto", even in this process
    register_backend(HOSTONLY, HostOnlyBackend, devices=("cpu",), priority=-1)


def measure(shape: str, T: int, dtype: str, rounds: int, groups: str, partial: bool = False) -> dict[str, float]:
    register_hostonly()
    adapters = synthetic.synthetic_adapters(shape, T, dtype=DTYPES[dtype])
    if partial:  # the last adapter lacks its first module: the plan checks every adapter of every module
        state, _ = adapters[-1]
        for key in [k for k in state if ".lora_" in k][:2]:
            del state[key]
    group_bytes = CUDA_RESIDENT_GROUP_BYTES if groups == "cuda" else None
    params = RobustMergeParams()
    sources = [open_adapter(a, i) for i, a in enumerate(adapters)]
    plan = build_plan(sources)
    device = torch.device("cpu")

    def produce():
        run = RobustMergeRun(plan, sources, params, HOSTONLY, device, group_bytes=group_bytes)
        run.produce(Emitter({}, {}, None, True))

    # the backend's part of produce (backends/tables.py), on inputs loaded beforehand
    run = RobustMergeRun(plan, sources, params, HOSTONLY, device, group_bytes=group_bytes)
    loaded = [run._load_group(group, False) for group in module_groups(plan.modules, run.group_bytes)]

    def tables_only():
        for inputs in loaded:
            tables.build_tables(inputs, params, device)

    return {
        "yardstick_ms": median_ms(lambda: sum(range(10**6)), rounds),
        "merge_ms": median_ms(lambda: rk.merge(adapters, backend=HOSTONLY, group_bytes=group_bytes), rounds),
        "open_sources_ms": median_ms(lambda: [open_adapter(a, i) for i, a in enumerate(adapters)], rounds),
        "build_plan_ms": median_ms(lambda: build_plan(sources), rounds),
        "produce_ms": median_ms(produce, rounds),
        "of_which_build_tables_ms": median_ms(tables_only, rounds),
    }


def main(argv=None) -> int:
    p = case_parser(__doc__, rounds=21)
    p.add_argument("--groups", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--partial", action="store_true", help="one module missing from the last adapter")
    args = p.parse_args(argv)
    row = measure(args.shape, args.T, args.dtype, args.rounds, args.groups, args.partial)
    n = len(synthetic.module_list(args.shape))
    title = (
        f"{args.shape} T={args.T} {args.dtype}{' partial' if args.partial else ''}, {args.groups} grouping: {n} "
        f"modules, {2 * n * args.T} LoRA tensors (CPU ms, median of {args.rounds})"
    )
    print_row(title, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
