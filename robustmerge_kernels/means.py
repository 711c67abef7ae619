"""docs/ALGORITHM.md §3 step 5 over adapters on disk: each non-LoRA tensor averaged in chunks of rows.

A projector or lm_head can be hundreds of megabytes per adapter; loading every adapter's
copy plus a float64 accumulator made peak memory grow with the number of adapters. Here
each chunk of rows is read from one adapter at a time (reference.mean_tensors_streaming),
so the result is bit-identical to mean_tensors and memory is the output plus one chunk.
"""

from __future__ import annotations

import torch

from .adapter_io.sources import AdapterSource
from .finite import all_finite, require_finite
from .plan import MeanPlan
from .reference import mean_tensors_streaming

CHUNK_ELEMS = 1 << 20  # 8 MiB of float64 accumulator per step


def _reader(source: AdapterSource, key: str, device: torch.device):
    def read(start, stop):
        x = source.get(key) if start is None else source.get_rows(key, start, stop)
        if not all_finite(x):  # name the adapter and tensor, with the count over the whole tensor
            require_finite(source.get(key), source.label, key)
        return x.to(device)

    return read


def mean_of_sources(mean: MeanPlan, sources: list[AdapterSource], device: torch.device,
                    chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:  # fmt: skip
    readers = [_reader(sources[t], key, device) for t, key in zip(mean.members, mean.keys)]
    return mean_tensors_streaming(readers, mean.shape, mean.out_dtype, chunk_elems)
