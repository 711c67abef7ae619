#!/usr/bin/env python
"""A small merge for compute-sanitizer (benchmarks/gpu_check.sh): every kernel path of a
GPU backend on a few modules -- float32 / float16 / bfloat16 inputs mixed, unaligned and
odd shapes (scalar heads and tails), a float32 matrix whose candidates overflow shared
memory, T above the fusion's staging width, float64 output, a B of 320,000 keys that the
CUDA backend's default threshold splits over 10 slices (bf16 and float32 members, so its
third launch runs) -- checked against the CPU
backend (thresholds equal, A* bit-identical). Exit status 0 when everything matches.

    python benchmarks/gpu_sanitize_case.py [--backend cuda|triton]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from robustmerge_kernels.backends import ModuleInputs, get_backend
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.plan import ModulePlan


def module(name, T, r, n, m, dtypes, out_dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, n, generator=g).to(dtypes[t % len(dtypes)]) for t in range(T)]
    b = [(torch.randn(m, r, generator=g) * 0.01).to(dtypes[(t + 1) % len(dtypes)]) for t in range(T)]
    plan = ModulePlan(name, f"{name}.A", f"{name}.B", r, n, m, tuple(range(T)), ("a",) * T, ("b",) * T,
                      tuple(0.5 + 0.1 * t for t in range(T)), out_dtype, 0)  # fmt: skip
    return ModuleInputs(plan, [x.to(device) for x in a], [x.to(device) for x in b])


def group(device):
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    return [
        module("mixed", 3, 4, 37, 29, [f32, f16, bf16], f32, 1, device),  # odd sizes: scalar head/tail
        module("wide", 2, 16, 4096, 1000, [f32], bf16, 2, device),  # float32: 3 passes, candidates
        module("ties", 10, 2, 64, 48, [bf16], f16, 3, device),  # T > staging width
        module("f64out", 2, 3, 8, 8, [f16], torch.float64, 4, device),
        module("vocab", 2, 16, 64, 20000, [bf16, f32], f32, 5, device),  # cuda: split selection of B
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda")
    args = p.parse_args(argv)
    params = RobustMergeParams()
    gpu = get_backend(args.backend, "cuda").run(group(torch.device("cuda")), params, details=True)
    cpu = get_backend("cpu", "cpu").run(group(torch.device("cpu")), params, details=True)
    torch.cuda.synchronize()
    bad = 0
    for i, (tg, tc) in enumerate(zip(gpu.tau_a + gpu.tau_b, cpu.tau_a + cpu.tau_b)):
        if not torch.equal(tg.cpu(), tc):
            print(f"threshold {i} differs: {tg.item()} vs {tc.item()}")
            bad += 1
    for g, (ag, bg), (ac, bc) in zip(group("cpu"), gpu.outputs, cpu.outputs):
        if not torch.equal(ag.cpu(), ac):
            print(f"{g.plan.name}: A* differs from the cpu backend")
            bad += 1
        if not torch.allclose(bg.cpu().double(), bc.double(), rtol=1e-2, atol=1e-6):
            print(f"{g.plan.name}: B* differs from the cpu backend beyond tolerance")
            bad += 1
    print(f"{args.backend}: {'OK' if not bad else f'{bad} mismatches'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
