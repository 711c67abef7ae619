"""methods/pcb.py against the independent oracle tests/_pcb_oracle.py (the PCB-merging
paper's steps as the official code computes them), on small random stacks and on stacks
full of ties, plus the edge cases where the official code divides 0 by 0."""

from __future__ import annotations

import _pcb_oracle
import numpy as np
import pytest
import torch

from robustmerge_kernels.methods import pcb_merge


def _ties(g, shape):
    """Values in {0, +-0.25, +-0.5, +-0.75}: ties in magnitudes, products and sums."""
    v = torch.randint(0, 4, shape, generator=g).double() * 0.25
    return v * (torch.randint(0, 2, shape, generator=g).double() * 2 - 1)


def _check(stack: torch.Tensor, ratio: float):
    got = pcb_merge(stack, pcb_ratio=ratio)
    assert got.shape == stack.shape[1:] and got.dtype == stack.dtype
    want = _pcb_oracle.pcb_merge(stack.reshape(stack.shape[0], -1).numpy(), ratio).reshape(stack.shape[1:])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    # the same entries dropped everywhere (a zero weight in every task gives exactly 0)
    assert np.array_equal(got.numpy() == 0, want == 0)
    return got, want


@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(4, 9), (12, 10), (1, 37)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_random_stacks_match_the_oracle(T, shape, ratio):
    g = torch.Generator().manual_seed(T * 100 + shape[0] + int(ratio * 10))
    stack = torch.randn(T, *shape, generator=g, dtype=torch.float64) * 0.05
    _check(stack, ratio)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_stacks_full_of_ties_match_the_oracle(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    T = 2 + seed % 3
    stack = _ties(g, (T, 6, 8))
    if seed % 2:  # two identical tasks: equal scores across tasks too
        stack[1] = stack[0]
    _check(stack, ratio)


def test_weights_keep_only_the_top_ratio_per_task():
    """With d = 200 distinct values and ratio 0.1, d - int(d * 0.9) - 1 = 19 entries per task
    keep a nonzero weight; with one task the merge is c on exactly those entries."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 200, generator=g, dtype=torch.float64)
    got, _ = _check(x, 0.1)
    assert int((got != 0).sum()) == _pcb_oracle.surviving_count(200, 0.1) == 19


def test_constant_task_and_all_dropped_give_zero_not_nan():
    """Where the official code computes 0/0 (a task with one magnitude everywhere, or a
    ratio that leaves no entry above the threshold), pcb.py and the oracle give 0."""
    g = torch.Generator().manual_seed(2)
    stack = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    stack[1] = 0.0  # constant task
    got, _ = _check(stack, 0.5)
    assert torch.isfinite(got).all()
    # d = 10, ratio 0.1: threshold position int(10 * 0.9) = 9 is the maximum: nothing survives
    small = torch.randn(2, 10, generator=g, dtype=torch.float64)
    got, _ = _check(small, 0.1)
    assert torch.equal(got, torch.zeros(10, dtype=torch.float64))


def test_float32_stacks_match_the_oracle_to_float32_rounding():
    g = torch.Generator().manual_seed(4)
    stack = torch.randn(3, 16, 12, generator=g) * 0.02
    got = pcb_merge(stack, pcb_ratio=0.3)
    assert got.dtype == torch.float32
    want = _pcb_oracle.pcb_merge(stack.double().reshape(3, -1).numpy(), 0.3).reshape(16, 12)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-6)
