"""The plan tables every compiled backend consumes (CPU C++, CUDA, Triton), and what they
share after a kernel call: status arrays to exceptions, thresholds and scales to details.

One row per (module, adapter) item and one per module, as int64 tensors, plus the
per-item B-scales. This module is the schema: ``ITEM_COLUMNS`` / ``MODULE_COLUMNS`` name the
columns in order. The C++ side declares the same list once
(csrc/robustmerge/plan_tables.h, an X-macro that yields its enums and the names the
bindings export); each compiled module's names are checked against these at load
(base.load_extension), and the Triton kernels take their column indices from here.
Building the tables validates the tensors against the plan, allocates the outputs on the
target device and keeps every tensor whose address is in a table alive for as long as the
tables are.
"""

from __future__ import annotations

import array
import functools
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from types import ModuleType
from typing import Any

import torch

from ..params import RobustMergeParams
from ..plan import ModulePlan
from ..reference import prune_count
from .base import BackendUnavailable, ModuleInputs, NonFiniteInput, OutputOverflow, load_extension

# Per (module, adapter) item: input addresses, their dtype codes, the prune counts k.
ITEM_COLUMNS = ("a", "b", "a_dtype", "b_dtype", "k_a", "k_b")
# Per module: shapes, its items [first, first + members), output addresses and dtype code,
# and the position of the clamp quantile among the sorted A-row scales.
MODULE_COLUMNS = (
    "rank",
    "in_features",
    "out_features",
    "first",
    "members",
    "out_a",
    "out_b",
    "out_dtype",
    "clamp_index",
)
ITEM = {name: i for i, name in enumerate(ITEM_COLUMNS)}  # column index by name
MODULE = {name: i for i, name in enumerate(MODULE_COLUMNS)}
KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # input types of the kernels
OUT_DTYPES = {**KERNEL_DTYPES, torch.float64: 3}
_SHAPE_DTYPE_DEVICE = attrgetter("shape", "dtype", "device")
_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass
class PlanTables:
    items: torch.Tensor  # int64 [W, len(ITEM_COLUMNS)]
    modules: torch.Tensor  # int64 [M, len(MODULE_COLUMNS)]
    b_scale: torch.Tensor  # float64 [W]
    outputs: list[tuple[torch.Tensor, torch.Tensor]]  # per module (A*, B*), allocated on `device`
    members: list[int]  # per module, its number of items
    keep_alive: list[Any] = field(default_factory=list)  # what holds the tabled inputs alive

    @property
    def n_items(self) -> int:
        return self.items.shape[0]

    def locate(self, item: int) -> tuple[int, int]:
        """Item index -> (module position in the group, member position)."""
        for m, count in enumerate(self.members):
            if item < count:
                return m, item
            item -= count
        raise IndexError(item)


def kernel_supported(g: ModuleInputs) -> bool:
    """Whether a module's inputs are all kernel input types (float64 ones are not)."""
    return all(x.dtype in KERNEL_DTYPES for x in (*g.a, *g.b))


class KernelDtypeError(ValueError):
    """An input of a type the kernels do not read (float64): its module goes elsewhere."""


def _check_input(x: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    if x.dtype not in KERNEL_DTYPES:  # first: such a module goes to the reference, wherever it is
        raise KernelDtypeError(f"kernels cannot read {x.dtype} for {what}")
    if x.device != device:
        raise ValueError(f"expected a tensor on {device} for {what}, got {x.device}")
    return x.contiguous()


def build_tables(group: list[ModuleInputs], params: RobustMergeParams, device: torch.device) -> PlanTables:
    """Tables for ``group`` (all kernel-supported), with outputs allocated on ``device``.

    The tables themselves stay on the CPU; a GPU backend copies them over. The usual case
    (every input contiguous, of a kernel dtype, on ``device``, shaped as planned) is checked
    and tabled with a few C-level passes over all tensors at once (``_fast_tables``: about
    0.3 us per tensor instead of 5, so a llava-7b T = 8 plan of 3,584 tensors costs well
    under 1 ms); anything else goes through ``_checked_tables``, the per-item loop that makes
    contiguous copies and names the module, member and reason of any error. Both give the
    same tables (tests/test_gpu_host.py compares them on random groups).
    """
    for g in group:  # refused before any allocation, as the per-item path does
        if g.plan.out_dtype not in OUT_DTYPES:
            raise ValueError(f"kernels cannot write {g.plan.out_dtype} for {g.plan.name}")
    fast = _fast_tables(group, params, device)
    return fast if fast is not None else _checked_tables(group, params, device)


def _module_rows(group: list[ModuleInputs], params: RobustMergeParams, device: torch.device):
    """Outputs allocated on ``device`` and the module table rows (shared by both paths)."""
    rows, first = [], 0
    outputs = list(zip(*allocate_outputs([g.plan for g in group], device)))
    for g, (out_a, out_b) in zip(group, outputs):
        p = g.plan
        clamp_index = min(int(p.rank * params.clamp_quantile), p.rank - 1)
        rows.append([
            p.rank, p.in_features, p.out_features, first, len(p.members),
            out_a.data_ptr(), out_b.data_ptr(), OUT_DTYPES[p.out_dtype], clamp_index,
        ])  # fmt: skip
        first += min(len(g.a), len(g.b))  # the items tabled for this module
    return rows, outputs


def _int64_column(values: list[int]) -> torch.Tensor:
    # array('q') converts a list of Python ints in C, about twice as fast as torch.tensor(list).
    return (
        torch.frombuffer(array.array("q", values), dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)
    )


@functools.cache
def _exchange() -> tuple[ModuleType, Any, tuple[type, ...]] | None:
    """(the _cpu module, torch's DLPack C exchange API capsule, the tensor types it may
    read), or None where either is missing (torch < 2.10, extension not built): then the
    fast path reads the tensors' attributes from Python instead."""
    capsule = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    if capsule is None:
        return None
    try:
        ext = load_extension("_cpu", "run `pip install -e .`")
        if not hasattr(ext, "fill_tables"):
            return None
        ext.check_exchange_api(capsule)
    except (BackendUnavailable, ValueError, TypeError):
        return None
    # Exact types only: a subclass may keep its data elsewhere than a plain tensor does.
    exchange = ext, capsule, (torch.Tensor, torch.nn.Parameter)
    return exchange if _exchange_reads_like_torch(exchange) else None


def _exchange_reads_like_torch(exchange) -> bool:
    """Whether the binding reads what torch reports for a small known module (addresses,
    dtype codes, shapes): a torch whose exchange API differed from the layout the binding
    declares would be caught here, once, and the attribute path used instead."""
    a, b = torch.empty(20)[5:].view(3, 5), torch.empty(4, 3, dtype=torch.bfloat16)  # a: at a storage offset
    plan = ModulePlan("m", "m.a", "m.b", 3, 5, 4, (0,), ("a",), ("b",), (0.5,), torch.float64, 0)
    group = [ModuleInputs(plan, [a], [b])]
    params = RobustMergeParams(density=0.5, clamp_quantile=0.5)
    cpu = torch.device("cpu")
    fast = _exchange_tables(group, params, cpu, [1], exchange, _dlpack_device(cpu))
    if fast is None:
        return False
    checked = _checked_tables(group, params, cpu)
    out_cols = [MODULE["out_a"], MODULE["out_b"]]
    same = [c for c in range(len(MODULE_COLUMNS)) if c not in out_cols]
    return (
        torch.equal(fast.items, checked.items)
        and torch.equal(fast.b_scale, checked.b_scale)
        and torch.equal(fast.modules[:, same], checked.modules[:, same])
        and fast.modules[0, out_cols].tolist() == [x.data_ptr() for x in fast.outputs[0]]
    )


# DLPack (type code, bits) of torch dtypes, as code * 256 + bits: kDLInt 0, kDLUInt 1,
# kDLFloat 2, kDLBfloat 4, kDLComplex 5, kDLBool 6. Checked once against torch's own answers.
_DLPACK_DTYPES = {
    2 * 256 + 32: torch.float32, 2 * 256 + 64: torch.float64, 2 * 256 + 16: torch.float16,
    4 * 256 + 16: torch.bfloat16, 0 * 256 + 8: torch.int8, 0 * 256 + 16: torch.int16, 0 * 256 + 32: torch.int32,
    0 * 256 + 64: torch.int64, 1 * 256 + 8: torch.uint8, 6 * 256 + 8: torch.bool, 5 * 256 + 64: torch.complex64,
    5 * 256 + 128: torch.complex128,
}  # fmt: skip


def read_headers(values: list[Any]) -> tuple[list[torch.dtype], list[tuple[int, ...]], set[torch.device]] | None:
    """(dtype, shape) per tensor and the set of their devices, read in one C pass through the
    DLPack exchange API; None when that path is unavailable or does not take every value
    (a subclass, a sparse, quantized, nested or meta tensor, another dtype or device):
    the caller then reads the attributes itself and names whatever is wrong."""
    if not _headers_usable():
        return None
    ext, capsule, types = _exchange()
    read = ext.read_headers(values, capsule, types, _DLPACK_DTYPES)
    if read is None:
        return None
    dtypes, shapes, pairs = read
    devices = set()
    for pair in pairs:
        device = _torch_device(*pair)
        if device is None:
            return None
        devices.add(device)
    return dtypes, shapes, devices


# DLPack device types of torch's "cpu" and "cuda" devices (kDLCPU; kDLROCM on ROCm builds,
# kDLCUDA otherwise), for both directions below.
_DL_CPU, _DL_GPU = 1, (10 if torch.version.hip else 2)


def _torch_device(device_type: int, device_id: int) -> torch.device | None:
    """The torch device of a DLPack (type, id) as torch reports its own tensors."""
    if device_type == _DL_CPU:
        return torch.device("cpu")
    if device_type == _DL_GPU:
        return torch.device("cuda", device_id)
    return None


@functools.cache
def _headers_usable() -> bool:
    """Whether read_headers gives torch's answers for a tensor of each dtype it maps."""
    exchange = _exchange()
    if exchange is None or not hasattr(exchange[0], "read_headers"):
        return False
    ext, capsule, types = exchange
    samples = [torch.empty(2, 3, dtype=d) for d in _DLPACK_DTYPES.values()] + [torch.empty(()), torch.empty(0, 5)]
    read = ext.read_headers(samples, capsule, types, _DLPACK_DTYPES)
    expected = ([x.dtype for x in samples], [tuple(x.shape) for x in samples], [(_DL_CPU, 0)])
    return read is not None and tuple(read) == expected


def _dlpack_device(device: torch.device) -> tuple[int, int] | None:
    """(DLPack device type, id) as torch reports ``device``; None for devices not handled."""
    if device.type == "cpu":
        return _DL_CPU, 0
    if device.type == "cuda" and device.index is not None:
        return _DL_GPU, device.index
    return None


def _fast_tables(group: list[ModuleInputs], params: RobustMergeParams, device: torch.device) -> PlanTables | None:
    """The tables from whole-group passes, or None when some tensor needs the checked path
    (wrong device, dtype or shape, not contiguous, or of a tensor subclass)."""
    members = [len(g.plan.members) for g in group]
    exchange, dl_device = _exchange(), _dlpack_device(device)
    if exchange is not None and dl_device is not None:  # the binding checks the list lengths itself
        return _exchange_tables(group, params, device, members, exchange, dl_device)
    if any(not len(g.a) == len(g.b) == len(g.plan.b_scale) == n for g, n in zip(group, members)):
        return None
    return _attribute_tables(group, params, device, members)


def allocate_outputs(plans: list[ModulePlan], device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each module's merged A and B, uninitialised, one storage each (so safetensors and
    CUDA IPC treat them as ordinary tensors)."""
    empty = torch.empty  # sizes as separate ints: torch parses them faster than a tuple (~0.7 vs 1.1 us here)
    out_a = [empty(p.rank, p.in_features, dtype=p.out_dtype, device=device) for p in plans]
    out_b = [empty(p.out_features, p.rank, dtype=p.out_dtype, device=device) for p in plans]
    return out_a, out_b


def _exchange_tables(group, params, device, members, exchange, dl_device) -> PlanTables | None:
    """The fast path through the DLPack C exchange API: Python allocates each module's two
    outputs, the binding reads the plans and every tensor (about 80 ns per tensor here,
    against ~1.3 us for the attribute reads of the path below) and fills all tables."""
    ext, capsule, types = exchange
    out_a, out_b = allocate_outputs([g.plan for g in group], device)
    W = sum(members)
    modules = torch.empty((len(group), len(MODULE_COLUMNS)), dtype=torch.int64)
    items = torch.empty((W, len(ITEM_COLUMNS)), dtype=torch.int64)
    b_scale = torch.empty(W, dtype=torch.float64)
    failed = ext.fill_tables(
        group, out_a, out_b, modules.data_ptr(), len(group), items.data_ptr(), W, b_scale.data_ptr(),
        params.density, params.clamp_quantile, OUT_DTYPES, *dl_device, capsule, types,
    )  # fmt: skip
    if failed >= 0:
        return None
    return PlanTables(
        items=items,
        modules=modules,
        b_scale=b_scale,
        outputs=list(zip(out_a, out_b)),
        members=members,
        keep_alive=list(group),  # holding the lists that hold the tabled inputs
    )


def _attribute_tables(
    group: list[ModuleInputs], params: RobustMergeParams, device: torch.device, members: list[int]
) -> PlanTables | None:
    """The fast path without the exchange API: map over C-level attribute accessors."""
    a = [x for g in group for x in g.a]
    b = [x for g in group for x in g.b]
    xs = a + b
    meta = list(map(_SHAPE_DTYPE_DEVICE, xs))  # one C-level pass: (shape, dtype, device) per tensor
    if set(map(_THIRD, meta)) != {device} or not all(map(torch.Tensor.is_contiguous, xs)):
        return None
    dtypes = list(map(_SECOND, meta))
    if not set(dtypes) <= KERNEL_DTYPES.keys():
        return None
    expected = [(g.plan.rank, g.plan.in_features) for g in group for _ in g.a]
    expected += [(g.plan.out_features, g.plan.rank) for g in group for _ in g.b]
    if list(map(_FIRST, meta)) != expected:  # torch.Size == tuple elementwise
        return None
    codes = list(map(KERNEL_DTYPES.__getitem__, dtypes))
    ptrs = list(map(torch.Tensor.data_ptr, xs))
    W = len(a)
    k_a = [prune_count(g.plan.rank * g.plan.in_features, params.density) for g in group]
    k_b = [prune_count(g.plan.out_features * g.plan.rank, params.density) for g in group]
    columns = [
        _int64_column(ptrs[:W]), _int64_column(ptrs[W:]), _int64_column(codes[:W]), _int64_column(codes[W:]),
        _int64_column([k for k, n in zip(k_a, members) for _ in range(n)]),
        _int64_column([k for k, n in zip(k_b, members) for _ in range(n)]),
    ]  # fmt: skip
    rows, outputs = _module_rows(group, params, device)
    b_scale = [s for g in group for s in g.plan.b_scale]
    return PlanTables(
        items=torch.stack(columns, 1),
        modules=torch.tensor(rows, dtype=torch.int64),
        b_scale=torch.tensor(b_scale, dtype=torch.float64),
        outputs=outputs,
        members=members,
        keep_alive=xs,
    )


def _checked_tables(group: list[ModuleInputs], params: RobustMergeParams, device: torch.device) -> PlanTables:
    """The per-item path: checks every tensor with an error naming it, copies
    non-contiguous ones."""
    items, b_scale, keep = [], [], []
    for g in group:
        p = g.plan
        for j, (a, b) in enumerate(zip(g.a, g.b)):
            a = _check_input(a, device, f"{p.name} lora_A of member {j}")
            b = _check_input(b, device, f"{p.name} lora_B of member {j}")
            if a.shape != (p.rank, p.in_features) or b.shape != (p.out_features, p.rank):
                raise ValueError(f"{p.name} member {j}: shapes {tuple(a.shape)}, {tuple(b.shape)} differ from the plan")
            keep += (a, b)  # contiguous copies must outlive the kernel call
            items.append([
                a.data_ptr(), b.data_ptr(), KERNEL_DTYPES[a.dtype], KERNEL_DTYPES[b.dtype],
                prune_count(a.numel(), params.density), prune_count(b.numel(), params.density),
            ])  # fmt: skip
            b_scale.append(p.b_scale[j])
    rows, outputs = _module_rows(group, params, device)
    return PlanTables(
        items=torch.tensor(items, dtype=torch.int64).reshape(-1, len(ITEM_COLUMNS)),
        modules=torch.tensor(rows, dtype=torch.int64),
        b_scale=torch.tensor(b_scale, dtype=torch.float64),
        outputs=outputs,
        members=[len(g.plan.members) for g in group],
        keep_alive=keep,
    )


def key_to_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """A magnitude key (the bits of |x|) as a value of ``dtype``."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    return torch.tensor([key], dtype=torch.int64).to(view).view(dtype)[0]


def raise_kernel_status(group, tables, ok, status: torch.Tensor, module_status: torch.Tensor) -> None:
    """Turn a kernel's status arrays into NonFiniteInput / OutputOverflow."""
    if not ok:
        bad = int(torch.nonzero(status)[0])
        factor = "A" if int(status[bad]) & 1 else "B"
        m, member = tables.locate(bad)
        raise NonFiniteInput(group[m].plan, member, factor)
    for g, flags in zip(group, module_status.tolist()):
        if flags:
            raise OutputOverflow(g.plan, "A" if flags & 1 else "B")


def unpack_details(group, tau: torch.Tensor, scales: torch.Tensor):
    """Kernel thresholds (magnitude keys, [W, 2]) and scales (concatenated) per item."""
    keys = (tau.to(torch.int64) & 0xFFFFFFFF).tolist()
    tau_a, tau_b, out_scales = [], [], []
    item, offset = 0, 0
    for g in group:
        for j in range(len(g.plan.members)):
            tau_a.append(key_to_value(keys[item][0], g.a[j].dtype))
            tau_b.append(key_to_value(keys[item][1], g.b[j].dtype))
            out_scales.append(scales[offset : offset + g.plan.rank].clone())
            offset += g.plan.rank
            item += 1
    return tau_a, tau_b, out_scales
