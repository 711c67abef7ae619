"""Data-parallel evaluation: which questions this process answers, and where.

Two ways to split a task's questions into shards, both with the official scripts'
``get_chunk`` (``--num-chunks N --chunk-idx K``: contiguous chunks of ``ceil(n / N)``
questions, in question-file order):

* under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment), rank
  K of N answers chunk K; the ranks meet at barriers (torch.distributed, gloo) and rank 0
  gathers the answers in question order and scores;
* ``--num-chunks N --chunk-idx K`` in N independent processes (the official scripts'
  way, e.g. one per GPU, possibly at different times): each writes its chunk, and the one
  that finds every question answered gathers and scores.

Each shard appends to its own ``answers.part-K-of-N.jsonl``; a single process writes
``answers.jsonl`` directly. The gathered ``answers.jsonl`` is in question order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


def get_chunk(items: list, n: int, k: int) -> list:
    """Chunk ``k`` of ``n`` as llava/eval/model_vqa*.py ``get_chunk`` cuts it (a chunk
    past the end, which the official code would fail on, is empty)."""
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"chunk index {k} out of range for {n} chunks")
    size = math.ceil(len(items) / n) if items else 1
    return items[k * size : (k + 1) * size]


@dataclass
class Shard:
    index: int = 0
    count: int = 1
    distributed: bool = False  # ranks of one torch.distributed job: barriers available
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def part_name(self) -> str:
        return "answers.jsonl" if self.count == 1 else f"answers.part-{self.index}-of-{self.count}.jsonl"

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, ok: bool) -> bool:
        """True on every rank only if ``ok`` on every rank (so that all ranks raise the
        same error instead of some waiting at a barrier for ever)."""
        if not self.distributed:
            return ok
        import torch
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1])
        dist.all_reduce(t)
        return int(t.item()) == 0


def detect(num_chunks: int | None = None, chunk_idx: int | None = None) -> Shard:
    """This process's shard: from ``--num-chunks/--chunk-idx``, else from torchrun's
    environment (initialising a gloo process group, which only carries barriers)."""
    if num_chunks is not None or chunk_idx is not None:
        n, k = num_chunks or 1, chunk_idx or 0
        if not 0 <= k < n:
            raise ValueError(f"--chunk-idx {k} out of range for --num-chunks {n}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--num-chunks/--chunk-idx and torchrun both split the questions; use one")
        return Shard(k, n)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size(), True, int(os.environ.get("LOCAL_RANK", "0")))
