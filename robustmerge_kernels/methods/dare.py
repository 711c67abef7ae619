"""DARE's random drop, reproducible: a counter-based hash of (seed, tensor, index).

``u = splitmix64(key(seed, tensor) + index) >> 11`` is a 53-bit integer; an entry is kept
iff ``u < floor(density * 2**53)``, so each entry survives with probability ``density``
independently of every other, and the mask depends only on the seed, the tensor's name
and the element's flat index: the same on every backend, every run and every thread
count (no framework RNG). Computed with vectorised int64 torch ops (wrapping multiply,
logical shifts by masking), in chunks to bound memory.

PEFT draws ``torch.bernoulli`` from the global RNG, so bit parity with PEFT is
impossible; tests check PEFT's formula with this mask substituted, and the drop rate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

_M64 = (1 << 64) - 1
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15
CHUNK = 1 << 22


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (the scalar form of :func:`hash_u53`)."""
    x &= _M64
    x ^= x >> 30
    x = (x * _C1) & _M64
    x ^= x >> 27
    x = (x * _C2) & _M64
    return x ^ (x >> 31)


def tensor_key(seed: int, name: str) -> int:
    """64-bit stream key of one tensor: the seed mixed with a stable hash of its name."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return splitmix64(splitmix64((int(seed) * _GOLDEN) & _M64) ^ h)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_u53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``splitmix64(key + i) >> 11`` for i in [start, start + count), as int64 in [0, 2**53)."""
    x = torch.arange(start, start + count, dtype=torch.int64, device=device) + _signed(key)
    x ^= _lsr(x, 30)
    x *= _signed(_C1)
    x ^= _lsr(x, 27)
    x *= _signed(_C2)
    x ^= _lsr(x, 31)
    return _lsr(x, 11)


def keep_mask(
    shape: Sequence[int], density: float, seed: int, name: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean DARE keep-mask of ``shape`` for the tensor called ``name``."""
    n = 1
    for s in shape:
        n *= int(s)
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    limit = int(density * (1 << 53))
    key = tensor_key(seed, name)
    out = torch.empty(n, dtype=torch.bool, device=device)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        out[start : start + count] = hash_u53(key, start, count, device) < limit
    return out.reshape(shape)
