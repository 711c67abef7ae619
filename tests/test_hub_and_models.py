"""Adapters where users keep them: Hub ids (through a Hub cache built here, offline),
several named adapters of one PeftModel, add_merged_adapter, and --push-to-hub."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from peft import get_peft_model_state_dict

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, adapter_dirs):
    """A huggingface_hub cache holding org/task0 (main and a tag v1), org/task1 and a repo
    with adapters in subfolders, laid out as huggingface_hub writes it
    (models--org--name/refs/<ref> -> commit, snapshots/<commit>/<files>); offline mode."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"

    def add(repo: str, files_from: dict[str, str], refs=("main",), commit=COMMIT):
        root = cache / f"models--{repo.replace('/', '--')}"
        snap = root / "snapshots" / commit
        for sub, folder in files_from.items():
            dst = snap / sub if sub else snap
            dst.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(folder):
                shutil.copy(os.path.join(folder, name), dst / name)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (root / "refs" / ref).write_text(commit)

    add("org/task0", {"": adapter_dirs[0]}, refs=("main", "v1"))
    add("org/task1", {"": adapter_dirs[1]})
    add("org/bundle", {"scienceqa": adapter_dirs[0], "vqav2": adapter_dirs[2]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_merge_like_the_folders_and_are_recorded(hub_cache, adapter_dirs, tmp_path):
    out = tmp_path / "merged"
    merged = rk.merge(["org/task0", "org/task1", "org/bundle/vqav2"], out=str(out))
    local = rk.merge([adapter_dirs[0], adapter_dirs[1], adapter_dirs[2]])
    assert merged.keys() == local.keys() and all(torch.equal(merged[k], local[k]) for k in local)
    record = json.loads((out / "robustmerge.json").read_text())
    hubs = [entry["hub"] for entry in record["inputs"]]
    assert [h["repo_id"] for h in hubs] == ["org/task0", "org/task1", "org/bundle"]
    assert all(h["commit"] == COMMIT for h in hubs)
    assert hubs[2]["subfolder"] == "vqav2"
    assert record["inputs"][0]["sha256"]["adapter_model.safetensors"]


def test_hub_revision_and_subfolder_are_parsed():
    assert hub.parse_hub_id("org/name@v1") == hub.HubRef("org/name", "v1", None)
    assert hub.parse_hub_id("AuroraZengfh/LLaVA_7B_lora_r16_scienceqa") == hub.HubRef(
        "AuroraZengfh/LLaVA_7B_lora_r16_scienceqa", None, None
    )
    assert hub.parse_hub_id("org/name/sub/dir@abc") == hub.HubRef("org/name", "abc", "sub/dir")
    for local in ("./org/name", "/abs/path", "~/x", "name", "a/../b", "a\\b"):
        assert hub.parse_hub_id(local) is None, local


def test_a_tagged_revision_resolves_through_the_cache(hub_cache, adapter_dirs):
    merged = rk.merge(["org/task0@v1", "org/task1"])
    local = rk.merge(adapter_dirs[:2])
    assert all(torch.equal(merged[k], local[k]) for k in local)


@pytest.mark.parametrize(
    "name, message",
    [
        ("org/absent", "org/absent"),
        ("org/task0@no-such-tag", "org/task0@no-such-tag"),
        ("org/bundle/nothing-here", "no adapter_config.json"),
    ],
)
def test_bad_hub_ids_name_the_id(hub_cache, adapter_dirs, name, message):
    with pytest.raises(rk.AdapterError, match="nor a Hub adapter") as info:
        rk.merge([adapter_dirs[0], name])
    assert message in str(info.value)
    assert info.value.adapter.startswith("#1")


def test_a_missing_local_folder_still_says_so(tmp_path, adapter_dirs):
    with pytest.raises(rk.AdapterError, match="no such adapter folder"):
        rk.merge([adapter_dirs[0], str(tmp_path / "absent")])


@pytest.fixture
def multi_adapter_model(base_model, trained_models):
    """One PeftModel holding the three trained adapters as "t0", "t1", "t2"."""
    from peft import set_peft_model_state_dict

    model = copy.deepcopy(trained_models[0])
    for i, other in enumerate(trained_models):
        model.add_adapter(f"t{i}", copy.deepcopy(other.peft_config["default"]))
        set_peft_model_state_dict(model, get_peft_model_state_dict(other), adapter_name=f"t{i}")
    model.set_adapter("t0")
    model.delete_adapter("default")
    return model


def test_named_adapters_of_one_peft_model(multi_adapter_model, trained_models):
    merged = rk.merge(multi_adapter_model, adapter_names=["t0", "t2"])
    pairs = [(get_peft_model_state_dict(m), m.peft_config["default"]) for m in (trained_models[0], trained_models[2])]
    expected = rk.merge(pairs)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert merged.report.adapters == ["#0 (t0)", "#1 (t2)"]
    with pytest.raises(rk.AdapterError, match="no adapter 'nope'"):
        rk.merge(multi_adapter_model, adapter_names=["t0", "nope"])
    with pytest.raises(rk.AdapterError, match="PeftModel"):
        rk.merge([{}], adapter_names=["t0"])


@pytest.mark.parametrize("method", ["robustmerge", "ties"])
def test_add_merged_adapter_sets_the_merged_delta_exactly(multi_adapter_model, method):
    model = multi_adapter_model
    merged = rk.add_merged_adapter(model, ["t0", "t1", "t2"], "merged", method=method, density=0.5)
    model.set_adapter("merged")
    scaling = merged.config["lora_alpha"] / merged.config["r"]
    assert max_delta_error_named(model, merged, scaling, "merged") == 0.0
    with pytest.raises(rk.AdapterError, match="already has an adapter"):
        rk.add_merged_adapter(model, ["t0", "t1"], "merged")


def test_add_merged_adapter_accepts_peft_option_names(multi_adapter_model):
    model = multi_adapter_model
    merged = rk.add_merged_adapter(
        model, adapters=["t0", "t1"], adapter_name="ties01", combination_type="ties", weights=[1.0, 0.5], density=0.3,
        svd_full_matrices=True,
    )  # fmt: skip
    assert merged.report.method == "ties" and "ties01" in model.peft_config
    expected = rk.merge(model, adapter_names=["t0", "t1"], method="ties", weights=[1.0, 0.5], density=0.3)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def max_delta_error_named(model, merged, scaling, name):
    from peft.tuners.lora import LoraLayer

    worst, seen = 0.0, 0
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a = merged[f"{module_name}.lora_A.weight"].float()
            b = merged[f"{module_name}.lora_B.weight"].float()
            got = module.get_delta_weight(name).float()
            worst = max(worst, (got - (b @ a) * scaling).abs().max().item())
            seen += 1
    assert seen > 0
    return worst


def test_push_to_hub_uploads_the_written_folder_with_a_card(adapter_dirs, tmp_path, monkeypatch):
    uploads = []

    def fake_upload(folder, repo_id):
        uploads.append((repo_id, sorted(os.listdir(folder)), (open(os.path.join(folder, "README.md")).read())))

    monkeypatch.setattr(hub, "_upload", fake_upload)
    out = tmp_path / "merged"
    rk.merge(adapter_dirs, out=str(out), push_to_hub="me/merged-adapter", lam=1.5)
    ((repo, files, card),) = uploads
    assert repo == "me/merged-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "robustmerge.json", "README.md"} <= set(files)
    assert "robustmerge" in card and "lam: `1.5`" in card and "#2" in card


def test_push_to_hub_failure_keeps_the_folder_and_says_so(adapter_dirs, tmp_path, monkeypatch):
    def broken(folder, repo_id):
        raise OSError("network unreachable")

    monkeypatch.setattr(hub, "_upload", broken)
    out = tmp_path / "merged"
    with pytest.raises(rk.AdapterError, match="written to .* but uploading it to 'me/x' failed: network unreachable"):
        rk.merge(adapter_dirs, out=str(out), push_to_hub="me/x")
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(rk.AdapterError, match="pass out="):
        rk.merge(adapter_dirs, push_to_hub="me/x")


def test_cli_takes_hub_ids(hub_cache, tmp_path, adapter_dirs):
    from robustmerge_kernels.cli import main

    assert main(["merge", "org/task0", "org/task1", "-o", str(tmp_path / "m"), "-q"]) == 0
    assert main(["merge", "org/task0", "org/absent", "-o", str(tmp_path / "m2"), "-q"]) == 2
