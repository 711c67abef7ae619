"""Baseline methods: this library's ``merge(method=...)`` vs PEFT's ``add_weighted_adapter``.

    python benchmarks/bench_methods.py [--shape llava-7b] [--tasks 8] [--peft-svd svd ties_svd]

Synthetic fp32 adapters (robustmerge_kernels.demo.synthetic), rank 16, ``T`` tasks. PEFT cannot
hold a 7B model here, so PEFT is timed on its own per-module code with the same tensors:
``LoraModel._generalized_task_arithmetic_weighted_adapter`` / ``_svd_generalized_...`` on a
stand-in LoRA layer (``cat``: the lines of ``add_weighted_adapter`` that build it).
Methods whose cost is a dense m x n SVD per module (PEFT's whole SVD family, our *_svd) are
timed on one module of each shape of layer 0 (q_proj 4096x4096, up_proj 11008x4096,
down_proj 4096x11008) and scaled to the model: layers * (4 q + 2 up + 1 down); the table
says so. Everything else is timed over the whole model. Not part of the pytest benchmarks
(the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

import robustmerge_kernels as rk
from robustmerge_kernels.demo import synthetic
from robustmerge_kernels.methods import METHODS, SVD_METHODS

FAST_PEFT = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")


class _Layer:
    """What PEFT's merge helpers read from a LoraLayer."""

    def __init__(self, As, Bs, scaling):
        names = [f"a{t}" for t in range(len(As))]
        self.lora_A = {n: SimpleNamespace(weight=SimpleNamespace(data=a)) for n, a in zip(names, As)}
        self.lora_B = {n: SimpleNamespace(weight=SimpleNamespace(data=b)) for n, b in zip(names, Bs)}
        for d in (self.lora_A, self.lora_B):
            for v in d.values():
                v.weight = v.weight.data
        self.lora_embedding_A = {}
        self.scaling = dict.fromkeys(names, scaling)
        self.fan_in_fan_out = False
        self.names = names

    def get_delta_weight(self, adapter):
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]


def peft_module(method, layer, weights, rank, density=0.2):
    from peft.tuners.lora.model import LoraModel

    names = layer.names
    if method == "cat":
        A = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for n, w in zip(names, weights)], dim=0)
        B = torch.cat([layer.lora_B[n].weight for n in names], dim=1)
        return A, B
    if method in SVD_METHODS:
        return LoraModel._svd_generalized_task_arithmetic_weighted_adapter(
            None, method, names, weights, rank, layer, None, None, density, "total"
        )
    return LoraModel._generalized_task_arithmetic_weighted_adapter(
        None, method, names, weights, layer, density, "total"
    )


def _modules(adapters):
    sd0 = adapters[0][0]
    for key in sd0:
        if key.endswith("lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            yield (
                prefix,
                [sd[f"{prefix}.lora_A.weight"] for sd, _ in adapters],
                [sd[f"{prefix}.lora_B.weight"] for sd, _ in adapters],
            )


def _representative(adapters):
    """Layer 0's q_proj, up_proj, down_proj and their weight in a layer (4, 2, 1)."""
    picked = {}
    for prefix, As, Bs in _modules(adapters):
        if ".layers.0." in prefix:
            for name, count in (("q_proj", 4), ("up_proj", 2), ("down_proj", 1)):
                if prefix.endswith(name):
                    picked[name] = (prefix, As, Bs, count)
    return list(picked.values())


def _rep_adapters(adapters, reps):
    keys = {f"{p}.lora_{f}.weight" for p, *_ in reps for f in "AB"}
    return [({k: v for k, v in sd.items() if k in keys}, cfg) for sd, cfg in adapters]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava-7b")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="*", default=["robustmerge", *METHODS])
    ap.add_argument("--peft-svd", nargs="*", default=["svd"], help="PEFT SVD-family methods to time (slow)")
    ap.add_argument("--ours-dense-svd", nargs="*", default=["ties_svd"], help="our *_svd methods to time")
    args = ap.parse_args(argv)

    shape = synthetic.get_shape(args.shape)
    T = args.tasks
    adapters = synthetic.synthetic_adapters(args.shape, T, rank=args.rank, dtype=torch.float32)
    weights = [1.0 / T] * T
    reps = _representative(adapters)
    scaling = adapters[0][1]["lora_alpha"] / adapters[0][1]["r"]
    print(f"{args.shape}: {shape.layers} layers, T={T}, r={args.rank}, fp32, torch threads {torch.get_num_threads()}")
    warm = _rep_adapters(adapters, reps[:1])  # imports and first-call costs, untimed
    for method in args.methods:
        rk.merge(warm, method=method)
        if method in FAST_PEFT or method in args.peft_svd:
            prefix, As, Bs, _ = reps[0]
            peft_module(method, _Layer([a[:, :64] for a in As], [b[:64] for b in Bs], scaling), weights, args.rank)
    rows = []
    for method in args.methods:
        note = ""
        if method in SVD_METHODS and method != "svd":
            if method not in args.ours_dense_svd:
                continue
            ours = _scaled(
                lambda a, b, p: rk.merge(_rep_adapters(adapters, [(p, a, b, 1)]), method=method, weights=weights),  # noqa: B023
                reps, shape.layers,
            )  # fmt: skip
            note = "ours: 3 modules timed, scaled"
        else:
            t0 = time.perf_counter()
            rk.merge(adapters, method=method, **({} if method == "robustmerge" else {"weights": weights}))
            ours = time.perf_counter() - t0
        peft = None
        if method in FAST_PEFT:
            t0 = time.perf_counter()
            for _prefix, As, Bs in _modules(adapters):
                peft_module(method, _Layer(As, Bs, scaling), weights, args.rank)
            peft = time.perf_counter() - t0
        elif method in SVD_METHODS and method in args.peft_svd:
            peft = _scaled(
                lambda a, b, p: peft_module(method, _Layer(a, b, scaling), weights, args.rank),  # noqa: B023
                reps,
                shape.layers,
            )
            note = (note + "; " if note else "") + "PEFT: 3 modules timed, scaled"
        rows.append((method, ours, peft, note))
        print(_row(rows[-1]), flush=True)
    print("\n| method | this library (s) | PEFT (s) | speed-up | note |\n|---|---|---|---|---|")
    for row in rows:
        print(_row(row))


def _scaled(fn, reps, layers):
    total = 0.0
    for prefix, As, Bs, count in reps:
        t0 = time.perf_counter()
        fn(As, Bs, prefix)
        total += (time.perf_counter() - t0) * count
    return total * layers


def _row(row):
    method, ours, peft, note = row
    speed = f"{peft / ours:.1f}x" if peft else "-"
    peft_s = f"{peft:.1f}" if peft is not None else "-"
    return f"| {method} | {ours:.2f} | {peft_s} | {speed} | {note} |"


if __name__ == "__main__":
    main()
