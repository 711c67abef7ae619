"""Benchmarks: ``robustmerge_kernels.merge`` per CPU backend vs. copying the same bytes.

Parametrised in conftest.py by case (shape, T, dtype[, layers]) and ``impl``: the
baselines ``copy``, ``copy-flat``, ``api-isfinite`` and every backend that
``available_backends("cpu")`` reports as ``"ok"``. Run ``pytest benchmarks/``;
see benchmarks/README.md.
"""

from __future__ import annotations

import torch

import robustmerge_kernels
from robustmerge_kernels.demo import synthetic
from robustmerge_kernels.finite import require_finite


def _copy_per_tensor(data):
    # Preallocated outputs, one copy_ per input tensor: the same tensors, sizes and count
    # (2 * T * modules) that merge() hands to a backend.
    pairs = [(torch.empty_like(x), x) for x in data.tensors]

    def run():
        for dst, src in pairs:
            dst.copy_(src)

    return run


def _copy_flat(data):
    # The same bytes as one contiguous buffer per adapter: bandwidth with no per-call overhead.
    pairs = [(torch.empty_like(f), f) for f in data.flat]

    def run():
        for dst, src in pairs:
            dst.copy_(src)

    return run


def _api_isfinite(data):
    # Exactly what merge()'s loader does to each input before a backend sees it.
    tensors = data.tensors

    def run():
        for x in tensors:
            require_finite(x, "synthetic", "tensor")

    return run


BASELINES = {"copy": _copy_per_tensor, "copy-flat": _copy_flat, "api-isfinite": _api_isfinite}


def _merge(data, backend, dtype):
    def run():
        # output in the input dtype (not the float32 default for half inputs), so the timings
        # stay comparable with the recorded results and with the paired copy
        return robustmerge_kernels.merge(data.adapters, backend=backend, dtype=dtype)

    return run


def test_merge(run_bench, bench_case, case_data, impl):
    if impl in BASELINES:
        run_bench(BASELINES[impl](case_data))
        return
    merged = run_bench(_merge(case_data, impl, bench_case.torch_dtype), paired_copy=_copy_per_tensor(case_data))
    # Cheap sanity checks, so ``--benchmark-disable`` doubles as a smoke test.
    modules = synthetic.module_list(bench_case.shape, bench_case.layers)
    assert len(merged) == 2 * len(modules)
    assert merged.report.backend == impl
    assert merged.report.bytes_in == case_data.bytes_read
    prefix, n, m = modules[0]
    a, b = merged[f"{prefix}.lora_A.weight"], merged[f"{prefix}.lora_B.weight"]
    assert a.shape == (bench_case.rank, n) and b.shape == (m, bench_case.rank)
    assert a.dtype == b.dtype == bench_case.torch_dtype
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
