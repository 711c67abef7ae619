"""Hostile or malformed input files: refused quickly, with bounded cost, as AdapterError."""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import warnings

import pytest
import torch
from _files import CONFIG, raw_safetensors, tiny_folder, tiny_tensors

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import safetensors_io

A, B = "base_model.model.layers.0.q.lora_A.weight", "base_model.model.layers.0.q.lora_B.weight"


def _folder_with(tmp_path, raw: bytes, name="bad") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(raw)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    return str(folder)


def _refused(folder, tmp_path, *patterns):
    with pytest.raises(rk.AdapterError) as info:
        rk.merge([folder], out=str(tmp_path / "out"))
    for p in patterns:
        assert p in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()
    return info.value


# ------------------------------------------------------------------ item 4: offsets


def _entry(shape, start, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("case,message", [
    ("overlap", "overlaps the previous tensor"),
    ("gap", "leaves a gap of 8 bytes"),
    ("trailing", "bytes after the last tensor"),
])  # fmt: skip
def test_offsets_must_cover_the_data_exactly(tmp_path, case, message):
    a = 2 * 6 * 4  # A [2, 6] f32
    header = {A: _entry([2, 6], 0, a), B: _entry([5, 2], a, a + 40)}
    data = bytes(a + 40)
    if case == "overlap":  # B reuses A's bytes: a small file standing for a large output
        header[B] = _entry([2, 5], 0, 40)
        data = bytes(a)
    elif case == "gap":
        header[B] = _entry([5, 2], a + 8, a + 48)
        data = bytes(a + 48)
    else:
        data += bytes(16)
    err = _refused(_folder_with(tmp_path, raw_safetensors(header, data)), tmp_path, message)
    assert err.adapter and err.tensor in (A, B, None)


def test_safetensors_library_agrees_on_overlaps(tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import load

    header = {A: _entry([2, 6], 0, 48), B: _entry([2, 5], 0, 40)}
    with pytest.raises(SafetensorError):
        load(raw_safetensors(header, bytes(48)))


# ------------------------------------------------------------------ item 7 and header oddities


def test_tensor_count_is_capped(tmp_path, monkeypatch):
    assert 10_000 <= safetensors_io.MAX_TENSORS <= 1_000_000
    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 3)
    tensors = {**tiny_tensors(0), **{f"extra.{i}": torch.zeros(1) for i in range(2)}}
    folder = tiny_folder(tmp_path / "many", tensors=tensors)
    _refused(folder, tmp_path, "lists 4 tensors, over the limit of 3")


def test_header_over_the_format_limit_is_named_as_such(tmp_path):
    folder = _folder_with(tmp_path, b"")
    path = os.path.join(folder, "adapter_model.safetensors")
    with open(path, "wb") as f:  # a sparse 110 MB file: the header length fits the file
        f.write((101 << 20).to_bytes(8, "little"))
        f.truncate(110 << 20)
    _refused(folder, tmp_path, "over the format's 100 MiB limit")


@pytest.mark.parametrize("header,message", [
    ({A: _entry([2, 6], 0, 48), "x": {"dtype": "F32", "shape": [1e400], "data_offsets": [48, 52]}}, "not a list of integers"),
    ({A: _entry([2, 6], 0, 48), "x": {"dtype": "F32", "shape": [1.0], "data_offsets": [48, 52]}}, "not a list of integers"),
    ({A: _entry([2, 6], 0, 48), "x": {"dtype": "F32", "shape": [True], "data_offsets": [48, 52]}}, "not a list of integers"),
    ({A: _entry([2, 6], 0, 48), "x": {"dtype": "F32", "shape": [1], "data_offsets": ["48", "52"]}}, "not a pair of integers"),
    ({A: _entry([2, 6], 0, 48), "x": {"dtype": ["F32"], "shape": [1], "data_offsets": [48, 52]}}, "unknown dtype"),
    ({A: _entry([2, 6], 0, 48), "x": [1, 2]}, "malformed tensor entry"),
])  # fmt: skip
def test_malformed_header_values(tmp_path, header, message):
    text = json.dumps(header).replace("Infinity", "1e400").encode()
    raw = len(text).to_bytes(8, "little") + text + bytes(52)
    _refused(_folder_with(tmp_path, raw), tmp_path, message)


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    deep = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _refused(_folder_with(tmp_path, len(deep).to_bytes(8, "little") + deep), tmp_path, "nested too deeply")
    folder = tiny_folder(tmp_path / "cfg")
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(folder, tmp_path, "adapter_config.json", "nested too deeply")


# ------------------------------------------------------------------ item 5: shared storage


def test_views_of_one_storage_in_a_bin_are_refused(tmp_path):
    folder = tiny_folder(tmp_path / "a")
    storage = torch.randn(1024)
    torch.save({f"model.mm_projector.{i}.weight": storage[:] for i in range(200)},
               os.path.join(folder, "non_lora_trainables.bin"))  # fmt: skip
    _refused(folder, tmp_path, "non_lora_trainables.bin", "share storage")


def test_distinct_tensors_in_a_bin_still_load(tmp_path):
    folder = tiny_folder(tmp_path / "a")
    torch.save({"model.mm_projector.0.weight": torch.randn(4, 4)}, os.path.join(folder, "non_lora_trainables.bin"))
    merged = rk.merge([folder])
    assert "model.mm_projector.0.weight" in merged


def test_pickled_objects_are_refused_without_advice_to_disable_weights_only(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    torch.save({A: torch.zeros(2, 6), "x": argparse.Namespace(a=1)}, folder / "adapter_model.bin")
    err = _refused(str(folder), tmp_path, "objects other than tensors")
    assert "weights_only=False" not in str(err) and "weights_only" not in str(err)


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_refused(kind):
    sd = {A: torch.randn(2, 6), B: torch.randn(5, 2)}
    sd[B] = sd[B].to_sparse() if kind == "sparse" else torch.empty(5, 2, device="meta")
    with pytest.raises(rk.AdapterError, match="sparse|meta tensor") as info:
        rk.merge([(sd, CONFIG)])
    assert info.value.tensor == B


# ------------------------------------------------------------------ item 6: what files are opened


def _in_thread(fn, timeout=20):
    box = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "merge hung"
    return box.get("exc")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "shard"])
def test_fifo_is_refused_at_once(tmp_path, name):
    folder = tiny_folder(tmp_path / "a")
    if name == "shard":
        os.remove(os.path.join(folder, "adapter_model.safetensors"))
        index = {"weight_map": {A: "fifo.safetensors", B: "fifo.safetensors"}}
        (tmp_path / "a" / "adapter_model.safetensors.index.json").write_text(json.dumps(index))
        name = "fifo.safetensors"
    else:
        os.remove(os.path.join(folder, name))
    os.mkfifo(os.path.join(folder, name))
    exc = _in_thread(lambda: rk.merge([folder], out=str(tmp_path / "out")))
    assert isinstance(exc, rk.AdapterError) and "FIFO" in str(exc), exc


@pytest.mark.parametrize("shard", [".", "..", "sub", "missing.safetensors", 5, None, "../a/x", "outside"])
def test_index_oddities_are_clear_errors(tmp_path, shard):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    (folder / "sub").mkdir()
    other = tiny_folder(tmp_path / "elsewhere")
    if shard == "outside":
        os.symlink(os.path.join(other, "adapter_model.safetensors"), folder / "outside")
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps({"weight_map": {A: shard, B: shard}}))
    _refused(str(folder), tmp_path)


@pytest.mark.parametrize("index", ['{"weight_map": []}', "[]", '{"weight_map": {}}', "{"])
def test_malformed_index(tmp_path, index):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    (folder / "adapter_model.safetensors.index.json").write_text(index)
    _refused(str(folder), tmp_path, "adapter_model.safetensors.index.json")


def test_sharded_index_is_hashed_in_the_record(tmp_path):
    src = tiny_folder(tmp_path / "src")
    rk.merge([src], out=str(tmp_path / "sharded"), max_shard_size=1)
    rk.merge([str(tmp_path / "sharded")], out=str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "robustmerge.json").read_text())
    assert "adapter_model.safetensors.index.json" in record["inputs"][0]["sha256"]


def test_same_folder_twice_warns(tmp_path):
    folder = tiny_folder(tmp_path / "a")
    with pytest.warns(UserWarning, match="same folder"):
        rk.merge([folder, str(tmp_path / "." / "a")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.merge([folder, tiny_folder(tmp_path / "b", seed=1)])


# ------------------------------------------------------------------ item 10: file descriptors


def test_more_adapters_than_file_descriptors(tmp_path):
    """1,100 adapters under a limit of 256 open files: nothing is held open per adapter
    (before, about limit - 6 adapters failed, blaming adapter_config.json)."""
    folders = [tiny_folder(tmp_path / f"a{i}", seed=i) for i in range(1100)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        merged = rk.merge(folders, out=str(tmp_path / "out"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(merged.report.adapters) == 1100
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_hugging_face_cache_snapshots_with_blob_symlinks_still_load(tmp_path):
    """Hub downloads are symlinks from snapshots/<rev>/ into ../../blobs/: allowed, while a
    symlink anywhere else outside the adapter folder is refused."""
    src = tiny_folder(tmp_path / "src")
    repo = tmp_path / "models--org--adapter"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        blob = repo / "blobs" / name.replace(".", "_")
        blob.write_bytes(open(os.path.join(src, name), "rb").read())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    assert len(rk.merge([str(snap)])) == 2
    os.remove(snap / "adapter_model.safetensors")
    os.symlink(os.path.join(src, "adapter_model.safetensors"), snap / "adapter_model.safetensors")
    with pytest.raises(rk.AdapterError, match="outside the adapter folder"):
        rk.merge([str(snap)])
