"""Merging across processes (and machines) with torch.distributed.

Every rank opens the same inputs (headers only) and builds the same plan; the plan's work
is cut into contiguous, byte-balanced shares (:func:`share_of`), one per rank. Each rank
reads only its share's tensors (positional reads), merges them on its device and writes
their bytes straight into the one pre-sized output file that rank 0 staged: every offset
is known from the plan, so nothing is gathered through rank 0. Rank 0 writes the header,
config and merge record and renames the staged folder into place only after every rank
has written and fsynced its part; a rank that fails makes every rank fail, and no output
folder appears. The bytes written do not depend on the number of ranks: each module is
merged by the same deterministic kernel whichever rank runs it.

The collectives used are object broadcasts and gathers of small Python objects (paths,
error strings, hashes, a plan digest), so gloo (CPU) and NCCL (GPU) groups both work.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AdapterError
from .plan import MeanPlan, MergePlan, ModulePlan


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device  # where this rank merges: its GPU under NCCL, else the CPU


def current() -> Ranks:
    """This process's place in the initialised default process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise AdapterError(
            "distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or run the CLI under torchrun)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        device = torch.device("cuda", local)
    return Ranks(rank, world, device)


def world_size() -> int:
    """Ranks of the initialised default process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_environment() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the default process group:
    NCCL when this process has a GPU of its own, else gloo. Returns whether it did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() > 0 and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return True


def owners(sizes: list[int], world: int) -> list[int]:
    """The rank of each work item: contiguous runs of about equal bytes, in plan order (so a
    rank's reads of each input file move forward). An item goes to the rank whose byte
    range holds its midpoint."""
    total = sum(sizes)
    out, before = [], 0
    for size in sizes:
        mid = before + size / 2
        out.append(min(world - 1, int(mid * world / total)) if total else 0)
        before += size
    return out


@dataclass(frozen=True)
class Share:
    """The part of a plan one rank merges and writes."""

    modules: list[ModulePlan]
    means: list[MeanPlan]
    sources: list[int]  # the inputs whose files this rank hashes for the record

    def keys(self) -> set[str]:
        """The keys of adapter_model.safetensors this rank writes."""
        keys = {k for m in self.modules for k in (m.a_key, m.b_key)}
        return keys | {mean.key for mean in self.means if mean.file is None}


def share_of(plan: MergePlan, ranks: Ranks) -> Share:
    """Modules and streamed means cut by input bytes; tensors of other files (the projector
    of an original LLaVA checkpoint, written with torch.save at the end) stay on rank 0."""
    n_sources = len(plan.sources)
    streamed = [mean for mean in plan.means if mean.file is None]
    sizes = [m.nbytes_in for m in plan.modules] + [_mean_bytes(mean) for mean in streamed]
    owner = owners(sizes, ranks.world)
    modules = [m for m, r in zip(plan.modules, owner) if r == ranks.rank]
    means = [mean for mean, r in zip(streamed, owner[len(plan.modules) :]) if r == ranks.rank]
    if ranks.rank == 0:
        means += [mean for mean in plan.means if mean.file is not None]
    return Share(modules, means, [t for t in range(n_sources) if t % ranks.world == ranks.rank])


def _mean_bytes(mean: MeanPlan) -> int:
    return math.prod(mean.shape) * mean.out_dtype.itemsize * len(mean.members)


def plan_digest(plan: MergePlan) -> str:
    """What every rank must agree on: output keys, shapes, dtypes, members and scales."""
    h = hashlib.sha256()
    for m in plan.modules:
        h.update(repr((m.a_key, m.b_key, m.rank, m.in_features, m.out_features, m.members, m.b_scale,
                       str(m.out_dtype))).encode())  # fmt: skip
    for mean in plan.means:
        h.update(repr((mean.key, mean.shape, mean.members, str(mean.out_dtype), mean.file)).encode())
    return h.hexdigest()


def all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(errors: list[str | None]) -> str | None:
    return next((e for e in errors if e), None)
