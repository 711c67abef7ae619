"""The Triton backend: the merge plan as pointer tables, one launch per phase per group.

Phases (kernels in this package: select.py, scales.py, fuse.py), each covering every
(module, adapter) pair of the group in one launch:

  1. thresholds: histogram radix select on the magnitude keys, one ``hist_kernel`` launch
     per digit (2 for 16-bit keys; 3 or 4 for float32, by the digit width
     ``select.digit_bits()`` picks for the installed triton); the last program of each
     matrix fixes the digit in the same launch; pass 1 also finds inf/NaN;
  2. ``fuse_kernel`` FACTOR 0: A*, and per (row, chunk) the sums of |A| and kept |A|
     (float64) from the same loads;
  3. ``weights_kernel``: A-row scales from those sums, per-task clamp, normalised weights;
  4. ``fuse_kernel`` FACTOR 1: B*.

The host reads the status buffers once, after the last phase (one synchronisation per
group). On a GPU the inputs must be CUDA tensors and the tables are copied to the device.
With ``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels run on the
CPU through Triton's interpreter and take CPU tensors: that is how the tests run without
a GPU. float64 modules take the reference path, as in the CPU backend.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..base import BackendUnavailable, KernelBackend, ModuleInputs
from ..tables import ITEM, KERNEL_DTYPES, MODULE, build_tables, raise_kernel_status, unpack_details
from . import interpreter_mode

try:
    import triton
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

HIST_BLOCK = 2048  # keys per histogram step
FUSE_BLOCK = 1024  # output elements per fusion step (A*: columns of one row)
MAX_PROGRAMS_PER_MATRIX = 32  # grid-stride programs per matrix (selection) / per module (fusion)
KEYS_PER_PROGRAM = 8 * HIST_BLOCK  # selection: each program sums its histogram over >= this many keys
STATE_COLS = 5  # common.py: prefix, rank, active, numel, count
# float32 matrices with more than two digits: pass 1 copies the keys of pass 0's digit (if
# at most this many) to a per-matrix buffer, and the later passes read those instead of the
# matrix. 32 KB per matrix.
CANDIDATES_PER_MATRIX = 8192
# Multiply, then add (no FMA contraction), as the C++ kernels and the reference do; explicit
# because Triton's default changes in 3.10.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


class TritonBackend(KernelBackend):
    name = "triton"
    checks_finite = True  # pass 1 of the selection sees inf/NaN; the fusion flags overflow as it stores

    def __init__(self):
        if triton is None:
            raise BackendUnavailable(f"triton is not importable ({_IMPORT_ERROR})")
        self.interpret = interpreter_mode()
        if not self.interpret and not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
        from . import kernels

        self._k = kernels

    def _device(self, group: list[ModuleInputs]) -> torch.device:
        device = group[0].a[0].device
        if self.interpret:
            if device.type != "cpu":
                raise ValueError(f"TRITON_INTERPRET=1 runs the triton kernels on CPU tensors, got {device}")
        elif device.type != "cuda":
            raise ValueError(f"the triton backend needs CUDA tensors, got {device}")
        return device

    def _run_kernel(self, group, params, details):
        device = self._device(group)
        # Triton launches on the current CUDA device: inputs on cuda:1 need cuda:1 current.
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return self._run_on_device(group, params, details, device)

    def _run_on_device(self, group, params, details, device):
        k = self._k
        tables = build_tables(group, params, device)
        W, M = tables.n_items, len(group)
        items_h, modules_h = tables.items, tables.modules
        ranks = modules_h[:, MODULE["rank"]]
        members = torch.tensor(tables.members, dtype=torch.int64)
        item_rank = torch.repeat_interleave(ranks, members)  # [W]
        item_module = torch.repeat_interleave(torch.arange(M, dtype=torch.int32), members)
        scale_offset = torch.zeros(W + 1, dtype=torch.int64)
        torch.cumsum(item_rank, 0, out=scale_offset[1:])
        numel = torch.stack(
            [
                item_rank * modules_h[item_module.long(), MODULE["in_features"]],
                modules_h[item_module.long(), MODULE["out_features"]] * item_rank,
            ],
            1,
        )
        ks = items_h[:, [ITEM["k_a"], ITEM["k_b"]]]
        if int(numel.max()) >= 2**31:
            raise ValueError("the triton kernels index matrices of fewer than 2**31 values")
        state = torch.zeros((2 * W, STATE_COLS), dtype=torch.int32)
        state[:, 1] = ks.reshape(-1).to(torch.int32)  # rank of tau: k
        state[:, 2] = (ks.reshape(-1) >= 1).to(torch.int32)  # k < 1: keep all, tau = 0
        state[:, 3] = numel.reshape(-1).to(torch.int32)
        wide = bool((items_h[:, [ITEM["a_dtype"], ITEM["b_dtype"]]] == KERNEL_DTYPES[torch.float32]).any())
        bits = k.digit_bits()
        passes = k.passes(bits, wide)
        # Whole blocks load 16-byte vectors when every input address allows it (torch's
        # allocations do; views into a buffer at odd offsets may not).
        aligned = bool((items_h[:, [ITEM["a"], ITEM["b"]]] % 16 == 0).all())
        n_scales = int(scale_offset[-1])
        rank_block = triton.next_power_of_2(int(ranks.max()))

        def dev(x):
            return x.to(device, non_blocking=True) if device.type != "cpu" else x

        items, modules, b_scale = dev(items_h), dev(modules_h), dev(tables.b_scale)
        scale_offset_d, state = dev(scale_offset[:-1].contiguous()), dev(state)
        compact = passes > 2  # only float32 keys have digits after pass 1
        cap = CANDIDATES_PER_MATRIX if compact else 1
        cand = torch.empty((2 * W if compact else 1) * cap, dtype=torch.int32, device=device)
        # Every zero-initialised int32 array in one buffer: one allocation, one memset. Each
        # part starts 16-byte aligned (pointer arguments keep Triton's aligned specialisation);
        # the statuses come first and together, so one copy brings them back.
        zeroed = _Int32Parts(
            status=(2 * W,),
            module_status=(M,),
            cand_count=(2 * W if compact else 1,),
            hist=(passes, 2 * W, 1 << bits),
            arrive=(passes, 2 * W),  # programs done, per pass
        ).zeros(device)
        status, module_status, cand_count = zeroed["status"], zeroed["module_status"], zeroed["cand_count"]
        hist, arrive = zeroed["hist"], zeroed["arrive"]
        raw_scales = torch.empty(n_scales, dtype=torch.float64, device=device)
        # Row-sum partials of the A fusion: per item, rank x ceil(in_features / FUSE_BLOCK) (total, kept).
        chunks = (modules_h[:, MODULE["in_features"]] + FUSE_BLOCK - 1) // FUSE_BLOCK
        item_parts = torch.repeat_interleave(ranks * chunks, members)
        part_offset = torch.zeros(W + 1, dtype=torch.int64)
        torch.cumsum(item_parts, 0, out=part_offset[1:])
        partials = torch.empty(2 * int(part_offset[-1]), dtype=torch.float64, device=device)
        part_offset_d = dev(part_offset[:-1].contiguous())
        scales = torch.empty(n_scales, dtype=torch.float64, device=device)
        weights = torch.empty(n_scales, dtype=torch.float32, device=device)

        max_numel = int(numel.max())
        per_matrix = max(1, min(MAX_PROGRAMS_PER_MATRIX, triton.cdiv(max_numel, KEYS_PER_PROGRAM)))
        for p in range(passes):
            k.hist_kernel[(2 * W, per_matrix)](
                items, state, hist[p], arrive[p], status, cand, cand_count, PASS=p, LAST_PASS=p == passes - 1,
                BITS=bits, BLOCK=HIST_BLOCK, ALIGNED=aligned, CAP=cap, CAPTURE=compact and p == 1,
                FROM_CANDIDATES=compact and p >= 2, **LAUNCH_OPTIONS,
            )  # fmt: skip
        max_out = int(
            (ranks * torch.maximum(modules_h[:, MODULE["in_features"]], modules_h[:, MODULE["out_features"]])).max()
        )
        per_module = max(1, min(MAX_PROGRAMS_PER_MATRIX * 4, triton.cdiv(max_out, FUSE_BLOCK)))
        fuse_args = (items, modules, b_scale, scale_offset_d, part_offset_d, partials, state, weights, module_status,
                     float(params.lam))  # fmt: skip
        k.fuse_kernel[(M, per_module)](*fuse_args, FACTOR=0, BLOCK=FUSE_BLOCK, **LAUNCH_OPTIONS)
        k.weights_kernel[(M,)](
            modules, scale_offset_d, part_offset_d, partials, raw_scales, scales, weights, RANK_BLOCK=rank_block,
            CHUNK=FUSE_BLOCK, **LAUNCH_OPTIONS,
        )  # fmt: skip
        k.fuse_kernel[(M, per_module)](*fuse_args, FACTOR=1, BLOCK=FUSE_BLOCK, **LAUNCH_OPTIONS)

        flags = zeroed.leading(["status", "module_status"]).cpu()  # the one synchronisation
        status, module_status = flags[: 2 * W].view(W, 2), flags[zeroed.offset("module_status") :][:M]
        item_status = status[:, 0] | (status[:, 1] << 1)
        raise_kernel_status(group, tables, not bool(item_status.any()), item_status, module_status)
        if not details:
            return tables.outputs, None
        tau = state.cpu()[:, 0].reshape(W, 2).contiguous()
        return tables.outputs, unpack_details(group, tau, scales.cpu())


class _Int32Parts:
    """Named int32 arrays laid out in one buffer, each starting on a 16-byte boundary."""

    def __init__(self, **shapes: tuple[int, ...]):
        self.shapes, self.offsets, end = shapes, {}, 0
        for name, shape in shapes.items():
            self.offsets[name] = end
            end += -(-math.prod(shape) // 4) * 4  # whole 16-byte units
        self.size = end

    def zeros(self, device: torch.device) -> _Int32Parts:
        self.buffer = torch.zeros(self.size, dtype=torch.int32, device=device)
        return self

    def offset(self, name: str) -> int:
        return self.offsets[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        start = self.offsets[name]
        return self.buffer[start : start + math.prod(self.shapes[name])].view(self.shapes[name])

    def leading(self, names: list[str]) -> torch.Tensor:
        """The buffer from its start to the end of the last of ``names`` (laid out first)."""
        assert list(self.shapes)[: len(names)] == names
        last = names[-1]
        return self.buffer[: self.offsets[last] + math.prod(self.shapes[last])]
