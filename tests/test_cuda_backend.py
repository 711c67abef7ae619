"""The CUDA C++ backend (robustmerge_kernels._cuda).

Runs everywhere:
  * the extension builds and exposes its entry points wherever nvcc is on the PATH
    (skipped, with the reason, only where it is not, or where RMK_CUDA=0 turned it off);
  * the binding's host-side validation rejects bad plan tables with ValueError before any
    CUDA call (no GPU needed: the tables are host memory, device addresses are opaque);
  * without a GPU, ``CudaBackend()`` raises BackendUnavailable naming the reason, and a
    valid plan given to the raw binding fails with a RuntimeError, not a crash.
Needs a CUDA device (skipped otherwise): the kernels run on the caller's stream and from
concurrent threads, and the raw binding refuses host addresses. The kernels against the
reference and the CPU backend (same thresholds, A* bit-identical), NaN/Inf and overflow
are the shared suite, tests/test_kernels.py, run there with the ``cuda`` backend.

Memory / race checking on a GPU machine (compute-sanitizer ships with the CUDA toolkit):

    compute-sanitizer --tool memcheck  --leak-check full python tests/test_cuda_backend.py --sanitize
    compute-sanitizer --tool racecheck python tests/test_cuda_backend.py --sanitize
    compute-sanitizer --tool synccheck python tests/test_cuda_backend.py --sanitize
    compute-sanitizer --tool initcheck python tests/test_cuda_backend.py --sanitize

``--sanitize`` runs one small merge (several modules, mixed dtypes, a matrix larger than
shared memory) and one with a NaN input, and checks them against the reference.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _cases, conftest when run as a script

from _cases import assert_close_to_exact, data_scale, kernel_masks, module_inputs, random_module  # noqa: E402

import robustmerge_kernels as rk  # noqa: E402
from robustmerge_kernels.backends import BackendUnavailable, NonFiniteInput  # noqa: E402
from robustmerge_kernels.backends import tables as plan_tables  # noqa: E402
from robustmerge_kernels.params import RobustMergeParams  # noqa: E402
from robustmerge_kernels.reference import robustmerge_module  # noqa: E402


def _importable() -> bool:
    try:
        from robustmerge_kernels import _cuda  # noqa: F401
    except ImportError:
        return False
    return True


NO_NVCC = shutil.which("nvcc") is None
CUDA_OFF = os.environ.get("RMK_CUDA", "").strip() == "0"
# Where nvcc is on the PATH the extension must have been built (the tests fail otherwise);
# where it is not, the tests still run if a module built elsewhere is present.
needs_extension = pytest.mark.skipif(
    (NO_NVCC or CUDA_OFF) and not _importable(),
    reason="nvcc is not on the PATH, so `pip install -e .` does not build the CUDA extension"
    if NO_NVCC
    else "RMK_CUDA=0: the CUDA extension was not built on purpose",
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)


def _ext():
    from robustmerge_kernels import _cuda

    return _cuda


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------
@needs_extension
def test_extension_builds_and_exposes_entry_points():
    try:
        ext = _ext()
    except ImportError as exc:  # nvcc is here, so the build must have produced the module
        pytest.fail(
            f"nvcc is on the PATH but robustmerge_kernels._cuda does not import ({exc}); run `pip install -e .`"
        )
    assert callable(ext.robustmerge) and callable(ext.device_count) and callable(ext.device_error)
    assert tuple(ext.ITEM_COLUMNS) == plan_tables.ITEM_COLUMNS
    assert tuple(ext.MODULE_COLUMNS) == plan_tables.MODULE_COLUMNS
    assert dict(ext.DTYPES) == {str(k).removeprefix("torch."): v for k, v in plan_tables.OUT_DTYPES.items()}
    archs = ext.ARCHITECTURES.split(",")
    for arch in ("80", "86", "90"):
        assert any(a.startswith(arch) for a in archs), (arch, archs)
    assert ext.runtime_version() >= 11020  # stream-ordered allocation
    params = [p.strip().split(":")[0] for p in ext.robustmerge.__doc__.split("(", 1)[1].split(")")[0].split(",")]
    assert params == ["items", "n_items", "b_scale", "modules", "n_modules", "lam", "stream", "status",
                      "module_status", "tau_out", "scales_out", "device", "workspace", "workspace_bytes",
                      "check_addresses", "split_elems"]  # fmt: skip


@needs_extension
def test_extension_imports_without_a_driver_and_reports_devices():
    ext = _ext()
    count = ext.device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert ext.device_error()  # the reason, e.g. cudaErrorNoDevice / InsufficientDriver
    else:
        assert ext.device_error() == ""


# --------------------------------------------------------------------------------------
# Host-side validation of the plan tables (no GPU needed)
# --------------------------------------------------------------------------------------
FAKE = 0x7F0000001000  # an opaque "device address": validation never dereferences it


def _raw(items=None, modules=None):
    """A valid host plan of two modules (2 + 1 items), each field overridable per row."""
    item = dict(a=FAKE, b=FAKE + 64, a_dtype=0, b_dtype=0, k_a=4, k_b=6)
    module = dict(rank=2, in_features=3, out_features=4, first=0, members=2, out_a=FAKE + 128, out_b=FAKE + 192,
                  out_dtype=0, clamp_index=1)  # fmt: skip
    item_rows = [dict(item), dict(item), dict(item)]
    module_rows = [dict(module), dict(module, first=2, members=1)]
    for rows, over in ((item_rows, items or {}), (module_rows, modules or {})):
        for idx, fields in over.items():
            rows[idx].update(fields)
    it = torch.tensor([[r[c] for c in plan_tables.ITEM_COLUMNS] for r in item_rows], dtype=torch.int64)
    md = torch.tensor([[r[c] for c in plan_tables.MODULE_COLUMNS] for r in module_rows], dtype=torch.int64)
    return it, md, torch.ones(len(item_rows), dtype=torch.float64)


def _call(ext, it, md, bs, n_items=None, n_modules=None, status=FAKE + 256, **kw):
    return ext.robustmerge(
        it.data_ptr(), it.shape[0] if n_items is None else n_items, bs.data_ptr(), md.data_ptr(),
        md.shape[0] if n_modules is None else n_modules, 2.0, 0, status, **kw,
    )  # fmt: skip


@needs_extension
@pytest.mark.parametrize(
    "items,modules,message",
    [
        ({0: {"a": 0}}, {}, "null input pointer"),
        ({2: {"b": 0}}, {}, "null input pointer"),
        ({}, {1: {"out_a": 0}}, "null output pointer"),
        ({1: {"a_dtype": 7}}, {}, "input dtype"),
        ({2: {"b_dtype": 3}}, {}, "input dtype"),  # float64 is not a kernel input type
        ({0: {"a_dtype": -1}}, {}, "input dtype"),
        ({}, {0: {"out_dtype": 4}}, "unknown output dtype"),
        ({0: {"k_a": 7}}, {}, "k of A out of range"),  # N = 6
        ({1: {"k_a": -1}}, {}, "k of A out of range"),
        ({2: {"k_b": 9}}, {}, "k of B out of range"),  # N = 8
        ({}, {1: {"clamp_index": 2}}, "clamp index out of range"),
        ({}, {0: {"clamp_index": -1}}, "clamp index out of range"),
        ({}, {0: {"rank": 0}}, "shapes must be positive"),
        ({}, {1: {"out_features": -4}}, "shapes must be positive"),
        ({}, {1: {"first": 1}}, "contiguous"),  # overlaps module 0's items
        ({}, {1: {"first": 3}}, "contiguous"),  # leaves a gap
        ({}, {0: {"members": 0}}, "contiguous"),
        ({}, {1: {"members": 2}}, "past the end"),
        ({}, {0: {"members": 1}}, "contiguous"),  # module 1 must then start at 1
    ],
)
def test_binding_validates_tables(items, modules, message):
    ext = _ext()
    it, md, bs = _raw(items, modules)
    with pytest.raises(ValueError, match=rf"robustmerge cuda kernel: .*{message}"):
        _call(ext, it, md, bs)


@needs_extension
def test_binding_rejects_huge_matrices_null_tables_and_bad_counts():
    ext = _ext()
    it, md, bs = _raw(modules={1: {"in_features": 1 << 30}}, items={2: {"k_a": 0}})
    with pytest.raises(ValueError, match="2\\^31 or more elements"):
        _call(ext, it, md, bs)
    it, md, bs = _raw()
    with pytest.raises(ValueError, match="empty plan"):
        _call(ext, it, md, bs, n_items=0)
    with pytest.raises(ValueError, match="empty plan"):
        _call(ext, it, md, bs, n_modules=0)
    with pytest.raises(ValueError, match="items not covered"):
        _call(ext, it, md, bs, n_items=4)  # the modules cover 3 items
    with pytest.raises(ValueError, match="null table pointer"):
        _call(ext, it, md, bs, status=0)
    with pytest.raises(ValueError, match="null table pointer"):
        ext.robustmerge(0, 3, bs.data_ptr(), md.data_ptr(), 2, 2.0, 0, FAKE)
    with pytest.raises(ValueError, match="null table pointer"):
        ext.robustmerge(it.data_ptr(), 3, 0, md.data_ptr(), 2, 2.0, 0, FAKE)
    with pytest.raises(ValueError, match="null table pointer"):
        ext.robustmerge(it.data_ptr(), 3, bs.data_ptr(), 0, 2, 2.0, 0, FAKE)
    with pytest.raises(ValueError, match="device"):
        _call(ext, it, md, bs, device=-2)
    with pytest.raises(TypeError):
        _call(ext, it, md, bs, status=-1)  # addresses are unsigned


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device path")
def test_valid_plan_without_a_device_raises_runtime_error():
    ext = _ext()
    it, md, bs = _raw()
    with pytest.raises(RuntimeError, match="robustmerge cuda kernel: .*failed: cuda"):
        _call(ext, it, md, bs)


# --------------------------------------------------------------------------------------
# The backend object and the registry
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_backend_unavailable_without_a_gpu():
    from robustmerge_kernels.backends.cuda import CudaBackend

    with pytest.raises(BackendUnavailable, match="CUDA"):
        CudaBackend()
    from robustmerge_kernels.backends import available_backends, get_backend

    reason = available_backends("cuda")["cuda"]
    assert reason != "ok" and ("CUDA device" in reason or "not built" in reason), reason
    with pytest.raises(rk.AdapterError, match="backend 'cuda' is unavailable"):
        get_backend("cuda", "cuda")
    with pytest.raises(rk.AdapterError, match="does not run on 'cpu'"):
        get_backend("cuda", "cpu")


# --------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------


def _gpu(xs):
    return [x.cuda() for x in xs]


def run_cuda(modules, params, details=True):
    from robustmerge_kernels.backends.cuda import CudaBackend

    return CudaBackend().run(modules, params, details=details)


def _many_modules(count, T, dtype, seed=0, device="cpu"):
    mods = []
    for i in range(count):
        a, b = random_module(seed + i, T=T, r=8, n=48 + i, m=40 + 3 * i, dtype=dtype)
        mods.append(module_inputs([x.to(device) for x in a], [x.to(device) for x in b], name=f"m{i}"))
    return mods


@needs_gpu
def test_runs_on_the_callers_stream():
    """Inputs written on a side stream right before the merge, no synchronisation: correct
    only if the kernels run on that (current) stream, after the writes."""
    params = RobustMergeParams()
    a, b = random_module(11, T=4, r=16, n=4096, m=4096, dtype=torch.float32)
    expected = run_cuda([module_inputs(_gpu(a), _gpu(b))], params, details=False).outputs[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ga = [torch.zeros_like(x, device="cuda") for x in a]
        gb = [torch.zeros_like(x, device="cuda") for x in b]
        torch.cuda._sleep(50_000_000)  # keep the side stream busy, so a wrong stream would race
        for dst, src in zip(ga + gb, a + b):
            dst.copy_(src.cuda(non_blocking=False))
        got = run_cuda([module_inputs(ga, gb)], params, details=False).outputs[0]
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_gpu
def test_concurrent_threads_each_on_their_own_stream():
    params = RobustMergeParams()
    mods = _many_modules(6, T=3, dtype=torch.bfloat16, device="cuda")
    expected = run_cuda(mods, params, details=False).outputs
    results, errors = [None] * 4, []

    def work(k):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                results[k] = [tuple(x.clone() for x in out) for out in run_cuda(mods, params, details=False).outputs]
            torch.cuda.synchronize()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for res in results:
        for (a0, b0), (a1, b1) in zip(expected, res):
            assert torch.equal(a0, a1) and torch.equal(b0, b1)


@needs_gpu
def test_auto_picks_cuda_for_cuda_tensors():
    """The shared suite names the backend; here merge() must choose it for CUDA tensors."""
    from conftest import lora_pair

    pairs = [lora_pair(i, r=4, n=37, m=29) for i in range(3)]
    merged = rk.merge([({k: v.cuda() for k, v in sd.items()}, cfg) for sd, cfg in pairs])
    assert merged.report.backend == "cuda"
    ref = rk.merge(pairs, backend="reference")
    for key in ref:
        assert_close_to_exact(
            merged[key].cpu(), ref[key].double(), ref[key].dtype, float(ref[key].abs().max()), 2.0, key
        )


@needs_gpu
def test_raw_binding_refuses_host_addresses_before_launching():
    ext = _ext()
    a, b = torch.ones(2, 3), torch.ones(4, 2)  # CPU tensors: host addresses
    out_a, out_b = torch.empty(2, 3, device="cuda"), torch.empty(4, 2, device="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    row = dict(a=a.data_ptr(), b=b.data_ptr(), a_dtype=0, b_dtype=0, k_a=4, k_b=6)
    mod = dict(rank=2, in_features=3, out_features=4, first=0, members=1, out_a=out_a.data_ptr(),
               out_b=out_b.data_ptr(), out_dtype=0, clamp_index=1)  # fmt: skip
    it = torch.tensor([[row[c] for c in plan_tables.ITEM_COLUMNS]], dtype=torch.int64)
    md = torch.tensor([[mod[c] for c in plan_tables.MODULE_COLUMNS]], dtype=torch.int64)
    bs = torch.ones(1, dtype=torch.float64)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="item input A of row 0 is not device memory"):
        ext.robustmerge(it.data_ptr(), 1, bs.data_ptr(), md.data_ptr(), 1, 2.0, stream, status.data_ptr())
    a, b = a.cuda(), b.cuda()
    it[0, 0], it[0, 1] = a.data_ptr(), b.data_ptr()
    host_status = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="status is not device memory"):
        ext.robustmerge(it.data_ptr(), 1, bs.data_ptr(), md.data_ptr(), 1, 2.0, stream, host_status.data_ptr())
    ext.robustmerge(it.data_ptr(), 1, bs.data_ptr(), md.data_ptr(), 1, 2.0, stream, status.data_ptr())
    assert int(status.cpu()[0]) == 0
    assert torch.equal(out_a.cpu(), torch.full((2, 3), 2.0))  # all ties kept, lam = 2
    assert torch.equal(out_b.cpu(), torch.full((4, 2), 2.0))  # weights 1 (one adapter)


def _sanitize_run() -> None:
    """A small merge for compute-sanitizer (see the module docstring)."""
    params = RobustMergeParams()
    a, b = random_module(1, T=3, r=16, n=11008, m=300, dtype=torch.float32)
    mods = [module_inputs(_gpu(a), _gpu(b), name="big")]
    a2, b2 = random_module(2, T=3, r=3, n=33, m=9, dtype=torch.float64)
    mods.append(module_inputs(_gpu([a2[0].half(), a2[1].bfloat16(), a2[2].float()]), _gpu([x.bfloat16() for x in b2]),
                              out_dtype=torch.bfloat16, name="mixed"))  # fmt: skip
    det = run_cuda(mods, params)
    torch.cuda.synchronize()
    ref = robustmerge_module(a, b, params)
    assert torch.equal(kernel_masks(a, [t.cpu() for t in det.tau_a[:3]]), ref.mask_a)
    assert_close_to_exact(det.outputs[0][0].cpu(), ref.a.double(), torch.float32, data_scale(a, 2.0), 2.0, "A")
    b[1][5, 3] = float("nan")
    try:
        run_cuda([module_inputs(_gpu(a), _gpu(b))], params)
        raise AssertionError("NaN not refused")
    except NonFiniteInput:
        pass
    print("sanitize run: ok")


if __name__ == "__main__":
    if "--sanitize" in sys.argv:
        _sanitize_run()
    else:
        sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
