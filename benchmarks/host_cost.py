#!/usr/bin/env python
"""Host-side cost of a CUDA-path merge call, measurable without a GPU.

What the cuda backend does on the host per group before the kernels run: ``build_tables``
(check every tensor, table its address / dtype / k, allocate the outputs) and, in the
binding, validation plus the derived tables and workspace layout (``_cuda.workspace_size``
runs exactly that code and makes no CUDA call). The table code only reads the tensors'
metadata, never their data, so CPU tensors of the real shapes (uninitialised) stand in for
CUDA ones: the DLPack exchange path (backends/tables.py ``_fast_tables``) reads CPU and
CUDA tensors with the same C call. The outputs are allocated on the CPU (malloc standing in
for torch's CUDA caching allocator); their allocation is also timed apart, on the CPU and on
``meta`` (dispatcher and Python cost only, no allocator).

    python benchmarks/host_cost.py                 # llava-7b, T = 8, bf16
    python benchmarks/host_cost.py --shape llava-7b --T 32 --rounds 21

CPU time (time.process_time) medians. In the same run: the attribute path (the fast path
where torch has no DLPack exchange API) and the per-item checked path (non-contiguous inputs
and error messages), and ``sum(range(10**6))`` as a yardstick of this machine's Python speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from robustmerge_kernels.backends import ModuleInputs, tables
from robustmerge_kernels.demo import synthetic
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.plan import ModulePlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan_group(shape: str, T: int, dtype: torch.dtype, rank: int = 16, device: str = "meta") -> list[ModuleInputs]:
    group = []
    for prefix, n, m in synthetic.module_list(shape):
        a = [torch.empty(rank, n, dtype=dtype, device=device) for _ in range(T)]
        b = [torch.empty(m, rank, dtype=dtype, device=device) for _ in range(T)]
        plan = ModulePlan(prefix, f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", rank, n, m, tuple(range(T)),
                          ("a",) * T, ("b",) * T, (1.0,) * T, dtype, 0)  # fmt: skip
        group.append(ModuleInputs(plan, a, b))
    return group


def median_ms(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def measure(shape: str, T: int, dtype: str, rounds: int) -> dict[str, float]:
    group = plan_group(shape, T, DTYPES[dtype], device="cpu")
    params, cpu, meta = RobustMergeParams(), torch.device("cpu"), torch.device("meta")
    exchange = tables._exchange() is not None
    assert tables._fast_tables(group, params, cpu) is not None, "llava-like plans must take the fast path"
    members, plans = [len(g.plan.members) for g in group], [g.plan for g in group]
    row = {
        "tables_fast_ms": median_ms(lambda: tables.build_tables(group, params, cpu), rounds),
        "tables_attributes_ms": median_ms(lambda: tables._attribute_tables(group, params, cpu, members), rounds),
        "tables_per_item_ms": median_ms(lambda: tables._checked_tables(group, params, cpu), rounds),
        "outputs_alloc_cpu_ms": median_ms(lambda: tables.allocate_outputs(plans, cpu), rounds),
        "outputs_alloc_meta_ms": median_ms(lambda: tables.allocate_outputs(plans, meta), rounds),
    }
    try:
        from robustmerge_kernels import _cuda
    except ImportError:
        _cuda = None
    if _cuda is not None:
        t = tables.build_tables(group, params, cpu)
        args = (t.items.data_ptr(), t.n_items, t.b_scale.data_ptr(), t.modules.data_ptr(), len(group))
        row["binding_validate_plan_ms"] = median_ms(lambda: _cuda.workspace_size(*args), rounds)
    # Tables with outputs allocated (CPU malloc standing in for the CUDA caching allocator)
    # plus the binding's validation: the host work before the kernels are queued.
    row["cuda_path_host_ms"] = row["tables_fast_ms"] + row.get("binding_validate_plan_ms", 0.0)
    # The same without allocating the outputs (the merge's results, not bookkeeping).
    row["cuda_path_host_without_outputs_ms"] = row["cuda_path_host_ms"] - row["outputs_alloc_cpu_ms"]
    row["python_yardstick_ms"] = median_ms(lambda: sum(range(10**6)), 5)
    row["dlpack_exchange"] = float(exchange)
    return row


def case_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The case options both host-cost scripts take (shape, T, dtype, rounds)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--shape", default="llava-7b")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=rounds)
    return p


def print_row(title: str, row: dict[str, float]) -> None:
    print(title)
    for key, value in row.items():
        print(f"  {key:26s} {value:8.3f}")


def main(argv=None) -> int:
    args = case_parser(__doc__, rounds=15).parse_args(argv)
    row = measure(args.shape, args.T, args.dtype, args.rounds)
    n = len(synthetic.module_list(args.shape))
    print_row(
        f"{args.shape} T={args.T} {args.dtype}: {n} modules, {2 * n * args.T} input tensors (CPU ms, median)", row
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
