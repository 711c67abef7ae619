"""Fuzz and fault suite: hostile headers, destinations, I/O faults and kill -9 at every step.

Fast by default; ROBUSTMERGE_FUZZ_EXAMPLES=N runs N examples per property (README's
reliability section quotes a run with N=2000). Every property states what must hold:
a merge either succeeds or raises AdapterError, never another exception; nothing the user
had (inputs, the current folder, a previous output, other folders) changes unless it was
the output being replaced; what is written is bounded by what was read.
"""

from __future__ import annotations

import errno
import json
import os
import warnings

import torch
from _files import CONFIG, tiny_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_destination import _tree, crash_commit

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import destination

EXAMPLES = int(os.environ.get("ROBUSTMERGE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
A, B = "base_model.model.layers.0.q.lora_A.weight", "base_model.model.layers.0.q.lora_B.weight"


def _hidden(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.startswith(".")]


# ------------------------------------------------------------------ hostile headers

_weird = st.one_of(st.integers(-3, 300), st.just(10**20), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                   st.none(), st.lists(st.integers(0, 9), max_size=2))  # fmt: skip
_dims = st.one_of(st.lists(st.integers(0, 12), max_size=3), st.lists(_weird, max_size=3), _weird)
_offsets = st.one_of(
    st.tuples(st.integers(0, 400), st.integers(0, 400)).map(list), st.lists(_weird, max_size=3), _weird
)
_dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "Q4", 5, None])
_entry = st.one_of(st.fixed_dictionaries({"dtype": _dtype, "shape": _dims, "data_offsets": _offsets}), _weird)
_key = st.sampled_from([A, B, "base_model.model.lm_head.weight", "base_model.model.layers.0.q.lora_B.bias", "x"])


@FUZZ
@given(header=st.dictionaries(_key, _entry, min_size=1, max_size=4), data_len=st.integers(0, 600),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)))  # fmt: skip
def test_hostile_headers_merge_or_fail_cleanly_with_bounded_output(tmp_path_factory, header, data_len, metadata):
    tmp = tmp_path_factory.mktemp("hdr")
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    text = json.dumps(header, allow_nan=True).encode()
    folder = tmp / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + os.urandom(data_len))
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    out = tmp / "out"
    try:
        rk.merge([str(folder)], out=str(out))
    except rk.AdapterError as exc:
        assert exc.adapter is not None, str(exc)
        assert not out.exists()
    else:  # output bounded by input: the data section was covered exactly, no more
        written = os.path.getsize(out / "adapter_model.safetensors")
        assert written <= 2 * (len(text) + data_len) + 4096
    assert _hidden(tmp) == []


# ------------------------------------------------------------------ destinations

_OUTS = ["", ".", "input", "parent_of_inputs", "cwd_parent", "adapter", "notes", "file", "symlink", "dangling",
         "new", "missing_parent", "long_name", "empty_dir"]  # fmt: skip


@FUZZ
@given(which=st.sampled_from(_OUTS), overwrite=st.sampled_from([False, True, "force"]))
def test_destinations_never_lose_what_they_must_not_replace(tmp_path_factory, monkeypatch, which, overwrite):
    root = tmp_path_factory.mktemp("dst")
    work = root / "work"
    ins = [tiny_folder(work / "in" / f"a{i}", seed=i) for i in range(2)]
    tiny_folder(work / "adapter")
    (work / "notes").mkdir()
    (work / "notes" / "thesis.tex").write_text("years")
    (work / "file").write_text("a file")
    (work / "empty_dir").mkdir()
    os.symlink(work / "adapter", work / "symlink")
    os.symlink(work / "nowhere", work / "dangling")
    monkeypatch.chdir(work)
    out = {"input": ins[0], "parent_of_inputs": str(work / "in"), "cwd_parent": str(root), "missing_parent":
           str(work / "no" / "out"), "long_name": str(work / ("n" * 256))}.get(which, which)  # fmt: skip
    before = _tree(work)
    try:
        rk.merge(ins, out=out, overwrite=overwrite)
        ok = True
    except rk.AdapterError:
        ok = False
    after = _tree(work)
    replaced = {"adapter", "empty_dir", "new"} | ({"notes"} if overwrite == "force" else set())
    if not overwrite:
        replaced = {"new"}
    assert ok == (which in replaced), (which, overwrite, ok)
    changed = {k.split(os.sep)[0] for k in set(before) ^ set(after) | {k for k in before if before[k] != after.get(k)}}
    assert changed <= ({which} if ok else set()), changed
    assert _hidden(work) == []


# ------------------------------------------------------------------ I/O faults


def _as_if_dead(tmp, out) -> None:
    """Rewrite the owner records this process left so they name a process that has ended."""
    dead = {"pid": 2**22 + 7, "start": "0"}
    records = [p / destination.OWNER_NAME for p in tmp.glob(".out*") if p.is_dir()]
    records += [p for p in tmp.glob(".out*.swap.json")] + [out / destination.OWNER_NAME]
    for path in records:
        if path.is_file():
            path.write_text(json.dumps({**json.loads(path.read_text()), **dead}))


_FAULTS = {"pwrite": (os, "pwrite"), "fsync": (os, "fsync"), "rename": (os, "rename"), "mkdir": (os, "mkdir"),
           "rename2": (destination, "rename2"), "ftruncate": (os, "ftruncate"), "remove": (os, "remove")}  # fmt: skip


@FUZZ
@given(fault=st.sampled_from(sorted(_FAULTS)), nth=st.integers(1, 6), overwrite=st.booleans(), fallback=st.booleans(),
       code=st.sampled_from([errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT]))  # fmt: skip
def test_io_faults_are_clear_errors_and_keep_the_previous_output(tmp_path_factory, monkeypatch, fault, nth, overwrite,
                                                                 fallback, code):  # fmt: skip
    tmp = tmp_path_factory.mktemp("io")
    ins = [tiny_folder(tmp / "in" / f"a{i}", seed=i) for i in range(2)]
    out = tmp / "out"
    if overwrite:
        rk.merge(ins[:1], out=str(out))
    before = _tree(out) if overwrite else None
    if fallback:
        monkeypatch.setattr(destination, "_renameat2", None)
    module, name = _FAULTS[fault]
    real, calls = getattr(module, name), [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(code, os.strerror(code))
        return real(*a, **k)

    monkeypatch.setattr(module, name, failing)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            rk.merge(ins, out=str(out), overwrite=overwrite)
            ok = True
        except rk.AdapterError as exc:
            assert os.strerror(code) in str(exc) or "appeared" in str(exc), str(exc)
            ok = False
    monkeypatch.setattr(module, name, real)
    tidy = [w for w in warned if "tidies up" in str(w.message)]  # a fault after the committing rename
    if tidy:
        assert ok
        _as_if_dead(tmp, out)  # leftovers are kept while their owner (this process) lives
        destination.recover(str(out))  # what the next run does once it has ended
    if ok:
        assert len(load_file(str(out / "adapter_model.safetensors"))) == 2
    elif overwrite:
        assert _tree(out) == before  # the previous adapter, untouched
    else:
        assert not out.exists()
    assert _hidden(tmp) == []


# ------------------------------------------------------------------ kill -9 during commit


@FUZZ
@given(step=st.sampled_from(["rename", "rename2", "fsync", "remove", "rmtree", "mkdir"]), nth=st.integers(1, 12),
       overwrite=st.booleans(), fallback=st.booleans())  # fmt: skip
def test_kill_at_any_step_of_the_commit_loses_nothing(tmp_path_factory, step, nth, overwrite, fallback):
    tmp = tmp_path_factory.mktemp("kill")
    out = tmp / "out"
    old = {"old": torch.zeros(2)}
    if overwrite:
        tiny_folder(out, tensors=old)
    new = {"new": torch.ones(3)}
    crash_commit(out, new, step, fallback, nth) if overwrite else _crash_new(out, new, step, fallback, nth)
    destination.recover(str(out))  # what `robustmerge recover OUT` and the next merge run
    if not overwrite and out.is_dir() and os.listdir(out) == []:
        assert fallback  # mkdir claimed the name, killed before the rename onto it: empty, harmless
    elif overwrite or out.exists():
        got = load_file(str(out / "adapter_model.safetensors"))
        assert got.keys() in ({"old"} if overwrite else set(), {"new"}) and (
            got.keys() != {"new"} or torch.equal(got["new"], new["new"])
        )
        assert not (out / destination.OWNER_NAME).exists()
    assert _hidden(tmp) == []


def _crash_new(out, tensors, step, fallback, nth):
    """crash_commit for a fresh output (no overwrite)."""
    import test_destination as td

    real = td.writer.StagedAdapter.__init__

    def no_overwrite(self, o, overwrite):
        real(self, o, False)

    td.writer.StagedAdapter.__init__ = no_overwrite
    try:
        return crash_commit(out, tensors, step, fallback, nth)
    finally:
        td.writer.StagedAdapter.__init__ = real
