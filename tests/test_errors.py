"""Bad input: a clear error naming the adapter, the tensor and the reason; nothing on disk."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import lora_pair
from safetensors.torch import load_file, save_file

import robustmerge_kernels as rk


@pytest.fixture(autouse=True, params=["reference", "cpu"])
def backend(request, monkeypatch):
    """Every bad input through each backend: they detect inf/NaN in different places."""
    monkeypatch.setenv("ROBUSTMERGE_BACKEND", request.param)
    return request.param


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _merge_expecting(adapters, tmp_path, *patterns, **kwargs):
    """Merge into tmp_path/out, expect an AdapterError matching every pattern, and no output."""
    out = tmp_path / "out"
    with pytest.raises(rk.AdapterError) as info:
        rk.merge(adapters, out=str(out), **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []
    return info.value


def test_missing_folder_config_and_weights(adapter_dirs, tmp_path):
    _merge_expecting([adapter_dirs[0], str(tmp_path / "nope")], tmp_path, "adapter #1", "no such adapter folder")
    no_config = _copy(adapter_dirs[1], tmp_path / "no_config")
    os.remove(os.path.join(no_config, "adapter_config.json"))
    _merge_expecting([adapter_dirs[0], no_config], tmp_path, "adapter #1", "missing adapter_config.json")
    no_weights = _copy(adapter_dirs[1], tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    _merge_expecting(
        [no_weights],
        tmp_path,
        "adapter #0",
        "no adapter_model.safetensors, adapter_model.safetensors.index.json or adapter_model.bin",
    )


def test_bad_config_json(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[1], tmp_path / "bad")
    with open(os.path.join(bad, "adapter_config.json"), "w") as f:
        f.write("{not json")
    _merge_expecting([adapter_dirs[0], bad], tmp_path, "adapter #1", "cannot parse adapter_config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(adapter_dirs, tmp_path, damage):
    bad = _copy(adapter_dirs[2], tmp_path / "bad")
    path = os.path.join(bad, "adapter_model.safetensors")
    data = open(path, "rb").read()
    data = data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:]
    open(path, "wb").write(data)
    _merge_expecting([adapter_dirs[0], bad], tmp_path, "adapter #1", "safetensors")


def test_bin_adapters_are_read_and_corrupt_bin_refused(adapter_dirs, tmp_path):
    as_bin = _copy(adapter_dirs[1], tmp_path / "as_bin")
    st = os.path.join(as_bin, "adapter_model.safetensors")
    torch.save(load_file(st), os.path.join(as_bin, "adapter_model.bin"))
    os.remove(st)
    a = rk.merge([adapter_dirs[0], as_bin])
    b = rk.merge(adapter_dirs[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)
    open(os.path.join(as_bin, "adapter_model.bin"), "wb").write(b"not a pickle")
    _merge_expecting([adapter_dirs[0], as_bin], tmp_path, "adapter #1", "cannot load")


def test_different_base_shapes(tmp_path):
    err = _merge_expecting(
        [lora_pair(0, n=12), lora_pair(1, n=16)], tmp_path, "adapter #1", "lora_A", "base layer shape"
    )
    assert err.adapter == "#1" and err.tensor.endswith("q.lora_A.weight")


def test_different_ranks_refused(tmp_path):
    _merge_expecting([lora_pair(0, r=4), lora_pair(1, r=8, alpha=16)], tmp_path, "adapter #1", "rank differs")


def test_lone_lora_a_without_lora_b(tmp_path):
    sd, config = lora_pair(0)
    del sd["base_model.model.layers.0.v.lora_B.weight"]
    _merge_expecting(
        [lora_pair(1), (sd, config)], tmp_path, "adapter #1", "layers.0.v.lora_A.weight", "has no matching lora_B"
    )


def test_rank_mismatch_inside_adapter(tmp_path):
    sd, config = lora_pair(0)
    sd["base_model.model.layers.0.q.lora_B.weight"] = torch.zeros(10, 3)
    _merge_expecting([(sd, config)], tmp_path, "adapter #0", "q.lora_B.weight", "rank mismatch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_non_finite_weights(tmp_path, bad, factor):
    sd, config = lora_pair(1)
    key = f"base_model.model.layers.0.v.{factor}.weight"
    sd[key][1, 2] = bad
    _merge_expecting([lora_pair(0), (sd, config)], tmp_path, "adapter #1", key, "NaN/Inf")


def test_non_finite_in_safetensors_file(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[0], tmp_path / "bad")
    path = os.path.join(bad, "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    _merge_expecting([adapter_dirs[1], bad], tmp_path, "adapter #1", key, "NaN/Inf")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"density": 0.0}, "density must be in (0, 1]"),
        ({"density": 1.5}, "density must be in (0, 1]"),
        ({"density": -0.1}, "density must be in (0, 1]"),
        ({"density": float("nan")}, "density must be a finite number"),
        ({"clamp_quantile": 1.2}, "clamp_quantile must be in [0, 1]"),
        ({"lam": float("inf")}, "lam must be a finite number"),
        ({"method": "magic"}, "unknown merge method 'magic'"),
        ({"dtype": "int8"}, "unknown output dtype"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    _merge_expecting([lora_pair(0)], tmp_path, message, **kwargs)


def test_zero_adapters_empty_adapter_and_wrong_container(tmp_path):
    _merge_expecting([], tmp_path, "no adapters given")
    _merge_expecting([({}, lora_pair(0)[1])], tmp_path, "adapter #0", "contains no lora_A/lora_B")
    _merge_expecting("some/folder", tmp_path, "must be a list")
    _merge_expecting([42], tmp_path, "adapter #0", "cannot read an adapter from a int")


def test_unsupported_variants_refused(tmp_path):
    sd, config = lora_pair(0)
    _merge_expecting([(sd, {**config, "use_dora": True})], tmp_path, "adapter #0", "DoRA")
    _merge_expecting([(sd, {**config, "lora_bias": True})], tmp_path, "adapter #0", "lora_B bias")
    _merge_expecting([(sd, {**config, "peft_type": "IA3"})], tmp_path, "adapter #0", "not LORA")
    dora = dict(sd)
    dora["base_model.model.layers.0.q.lora_magnitude_vector"] = torch.ones(10)
    _merge_expecting([(dora, config)], tmp_path, "adapter #0", "lora_magnitude_vector", "unsupported LoRA tensor")
    biased = dict(sd)
    biased["base_model.model.layers.0.q.lora_B.bias"] = torch.ones(10)
    _merge_expecting([(biased, config)], tmp_path, "adapter #0", "lora_B.bias")


def test_config_and_weights_disagree(tmp_path):
    sd, config = lora_pair(0, r=4)
    _merge_expecting([(sd, {**config, "r": 8})], tmp_path, "adapter #0", "config says r=8")
    _merge_expecting([(sd, {**config, "lora_alpha": 0})], tmp_path, "adapter #0", "lora_alpha")


def test_config_missing_for_some_adapters_refused(tmp_path):
    sd, _ = lora_pair(1)
    _merge_expecting([lora_pair(0), sd], tmp_path, "adapter #1", "has no LoRA config")
    # With no config at all the merge works in memory but cannot write a PEFT folder.
    assert rk.merge([sd]).config is None
    _merge_expecting([sd], tmp_path, "no adapter came with a LoRA config")


def test_duplicate_factor_keys(tmp_path):
    sd, config = lora_pair(0)
    sd["base_model.model.layers.0.q.lora_A.default.weight"] = sd["base_model.model.layers.0.q.lora_A.weight"]
    _merge_expecting([(sd, config)], tmp_path, "adapter #0", "duplicate lora_A")


def test_mismatched_non_lora_tensor(tmp_path):
    a, ca = lora_pair(0)
    b, cb = lora_pair(1)
    a["base_model.model.mm_projector.0.weight"] = torch.zeros(4, 4)
    b["base_model.model.mm_projector.0.weight"] = torch.zeros(4, 5)
    _merge_expecting([(a, ca), (b, cb)], tmp_path, "adapter #1", "mm_projector.0.weight", "must match")


def test_unwritable_output_parent(tmp_path):
    with pytest.raises(rk.AdapterError, match="parent folder"):
        rk.merge([lora_pair(0)], out=str(tmp_path / "missing" / "out"))


def test_failure_during_write_leaves_nothing_and_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rk.merge([lora_pair(0)], out=str(out))
    before = load_file(str(out / "adapter_model.safetensors"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("robustmerge_kernels.adapter_io.writer._write_json", crash)
    with pytest.raises(rk.AdapterError, match="cannot write the output .*disk full"):  # named, exit 2
        rk.merge([lora_pair(1)], out=str(out), overwrite=True)
    after = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_output_overflowing_its_dtype_is_refused(tmp_path):
    """Finite fp16 inputs whose merge exceeds 65504 would silently become inf: refused."""
    sd, config = lora_pair(0, dtype=torch.float16)
    sd["base_model.model.layers.0.q.lora_A.weight"].fill_(6e4)
    _merge_expecting([(sd, config), (sd, config)], tmp_path, "q.lora_A.weight", "overflow the output dtype torch.float16",
                     dtype="fp16")  # fmt: skip
    default = rk.merge([(sd, config), (sd, config)])["base_model.model.layers.0.q.lora_A.weight"]  # float32 output
    assert default.dtype == torch.float32 and torch.isfinite(default).all()


def test_legacy_bin_format_is_read(adapter_dirs, tmp_path):
    """Pre-1.6 torch.save files (not zip, so not memory-mappable) still load."""
    legacy = _copy(adapter_dirs[1], tmp_path / "legacy")
    st = os.path.join(legacy, "adapter_model.safetensors")
    torch.save(load_file(st), os.path.join(legacy, "adapter_model.bin"), _use_new_zipfile_serialization=False)
    os.remove(st)
    a = rk.merge([adapter_dirs[0], legacy])
    b = rk.merge(adapter_dirs[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)
