"""The merge record's sha256 memory: what it trusts, and that it never makes a record wrong."""

from __future__ import annotations

import hashlib
import json
import os

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import record


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_second_merge_hashes_nothing_and_records_the_same(adapter_dirs, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTMERGE_CACHE_DIR", str(cache_dir))
    calls = []
    real = record.file_sha256
    monkeypatch.setattr(record, "file_sha256", lambda p: calls.append(p) or real(p))
    rk.merge(adapter_dirs, out=str(tmp_path / "a"))
    first = len(calls)
    assert first == 2 * len(adapter_dirs)  # adapter_config.json + weights of each
    rk.merge(adapter_dirs, out=str(tmp_path / "b"), lam=1.0)
    assert len(calls) == first  # remembered
    ra, rb = (json.loads((tmp_path / n / "robustmerge.json").read_text()) for n in "ab")
    assert [i["sha256"] for i in ra["inputs"]] == [i["sha256"] for i in rb["inputs"]]
    weights = os.path.join(adapter_dirs[0], "adapter_model.safetensors")
    assert ra["inputs"][0]["sha256"]["adapter_model.safetensors"] == _sha(weights)


def test_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMERGE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    cache = record.HashCache()
    assert cache.sha256(str(f)) == _sha(f)
    cache.save()
    f.write_bytes(b"two!")  # new size and mtime
    assert record.HashCache().sha256(str(f)) == _sha(f)
    os.utime(f, ns=(1, 1))  # same size, other mtime
    f.write_bytes(b"TWO!")
    os.utime(f, ns=(2, 2))
    assert record.HashCache().sha256(str(f)) == _sha(f)


def test_hub_blobs_are_named_by_their_hash_and_a_broken_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMERGE_CACHE_DIR", str(tmp_path / "cache"))
    blobs = tmp_path / "models--org--x" / "blobs"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(b"weights").hexdigest()
    (blobs / digest).write_bytes(b"weights")
    link = tmp_path / "adapter_model.safetensors"
    link.symlink_to(blobs / digest)
    monkeypatch.setattr(record, "file_sha256", lambda p: (_ for _ in ()).throw(AssertionError("read")))
    assert record.HashCache().sha256(str(link)) == digest
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / record.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(record, "file_sha256", lambda p: "0" * 64)
    assert record.HashCache().sha256(str(tmp_path / "cache" / record.CACHE_FILE)) == "0" * 64


def test_the_memory_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTMERGE_HASH_CACHE", "0")
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    cache = record.HashCache()
    cache.sha256(str(f))
    cache.save()
    assert not (tmp_path / "cache").exists()


def test_record_says_folder_inputs_are_on_disk_and_dicts_in_memory(adapter_dirs, trained_models, tmp_path):
    from peft import get_peft_model_state_dict

    pair = (get_peft_model_state_dict(trained_models[2]), trained_models[2].peft_config["default"])
    rk.merge([adapter_dirs[0], adapter_dirs[1], pair], out=str(tmp_path / "m"))
    inputs = json.loads((tmp_path / "m" / "robustmerge.json").read_text())["inputs"]
    for entry in inputs[:2]:
        assert "in_memory" not in entry and "hub" not in entry and entry["sha256"]
    assert inputs[2]["in_memory"] is True and "sha256" not in inputs[2]
