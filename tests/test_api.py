"""merge() through its public inputs and outputs, with peft loading the results."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import pytest
import torch
from _cases import assert_close_to_exact
from conftest import lora_pair
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels.demo import max_delta_error
from robustmerge_kernels.demo.toy import tiny_llama, train_adapter
from robustmerge_kernels.reference import robustmerge_module


def test_folders_state_dicts_pairs_and_models_agree(adapter_dirs, trained_models):
    from_folders = rk.merge(adapter_dirs)
    from_pairs = rk.merge([(get_peft_model_state_dict(m), m.peft_config["default"]) for m in trained_models])
    from_models = rk.merge(trained_models)
    from_dicts = rk.merge([get_peft_model_state_dict(m) for m in trained_models])
    assert from_folders.keys() == from_pairs.keys() == from_models.keys() == from_dicts.keys()
    for key in from_folders:
        for other in (from_pairs, from_models, from_dicts):
            assert torch.equal(from_folders[key], other[key]), key
    assert from_dicts.config is None  # no config given: nothing to write, nothing guessed
    assert from_folders.config["r"] == 4 and from_folders.config["inference_mode"] is True


def test_written_adapter_loads_in_peft_with_the_returned_delta(adapter_dirs, base_model, tmp_path):
    out = tmp_path / "merged"
    merged = rk.merge(adapter_dirs, out=str(out))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "robustmerge.json"]
    assert load_file(str(out / "adapter_model.safetensors")).keys() == merged.keys()

    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out)).eval()
    scaling = merged.config["lora_alpha"] / merged.config["r"]
    # Every LoRA layer is populated from the file (peft warns on missing keys, we demand none).
    n_layers = sum(1 for n, _ in loaded.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert n_layers == 4
    assert max_delta_error(loaded, merged, scaling) == 0.0

    # The delta peft applies is (B* @ A*) * scaling with B*, A* recomputed from the inputs.
    name = "base_model.model.model.layers.1.mlp.down_proj"
    srcs = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs]
    res = robustmerge_module(
        [s[f"{name}.lora_A.weight"] for s in srcs], [s[f"{name}.lora_B.weight"] for s in srcs], rk.RobustMergeParams()
    )
    layer = loaded.get_submodule(name)
    torch.testing.assert_close(layer.get_delta_weight("default"), (res.b @ res.a) * scaling)

    record = json.loads((out / "robustmerge.json").read_text())
    assert record["method"] == "robustmerge" and record["hyperparameters"]["density"] == 0.2
    assert record["version"] == rk.__version__ and record["backend"] == merged.report.backend
    for entry, folder in zip(record["inputs"], adapter_dirs):
        assert entry["folder"] == os.path.abspath(folder) and entry["label"].endswith(f"({folder})")
        weights = os.path.join(folder, "adapter_model.safetensors")
        assert entry["sha256"]["adapter_model.safetensors"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
        assert set(entry["sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_existing_output_refused_then_replaced_with_overwrite(adapter_dirs, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    (out / "adapter_config.json").write_text("{}")  # --overwrite replaces only adapter folders
    with pytest.raises(rk.AdapterError, match="already exists"):
        rk.merge(adapter_dirs, out=str(out))
    assert (out / "keep.txt").read_text() == "user data"
    rk.merge(adapter_dirs, out=str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp or backup left


def test_different_scalings_are_folded_into_b(base_model, tmp_path):
    """Adapters with other alpha/r/rsLoRA merge as if each had been trained at the output scaling."""
    m0 = train_adapter(base_model, 0, steps=3, r=4, lora_alpha=8)
    m1 = train_adapter(base_model, 1, steps=3, r=4, lora_alpha=32, use_rslora=True)
    m2 = train_adapter(base_model, 2, steps=3, r=4, lora_alpha=2, alpha_pattern={"down_proj": 12})
    merged = rk.merge([m0, m1, m2], out=str(tmp_path / "m"))
    assert merged.config["lora_alpha"] == 8 and not merged.config.get("use_rslora")

    def scaling(model, module):
        return model.get_submodule(module).scaling["default"]

    for module in ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.mlp.down_proj"):
        models = (m0, m1, m2)
        out_scaling = scaling(m0, module)
        # Fold each adapter's scaling into B by hand and merge at the output scaling.
        b_scale = [scaling(m, module) / out_scaling for m in models]
        assert b_scale[1] == pytest.approx(32 / math.sqrt(4) / 2) and b_scale[0] == 1.0
        layers = [m.get_submodule(module) for m in models]
        res = robustmerge_module(
            [layer.lora_A["default"].weight.detach() for layer in layers],
            [layer.lora_B["default"].weight.detach() for layer in layers],
            rk.RobustMergeParams(),
            b_scale=b_scale,
        )
        torch.testing.assert_close(merged[f"{module}.lora_B.weight"], res.b)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "m"))
        torch.testing.assert_close(
            loaded.get_submodule(module).get_delta_weight("default"), (res.b @ res.a) * out_scaling
        )


def test_modules_missing_from_some_adapters_merge_over_those_that_have_them():
    full = lora_pair(0, modules=("q", "v"))
    only_q = lora_pair(1, modules=("q",))
    merged = rk.merge([full, only_q])
    v_alone = rk.merge([({k: v for k, v in full[0].items() if ".v." in k}, full[1])])
    key = "base_model.model.layers.0.v.lora_B.weight"
    assert torch.equal(merged[key], v_alone[key])
    assert merged.report.partial_modules == {"base_model.model.layers.0.v": ["#1"]}
    assert merged.config["target_modules"] == ["q", "v"]


def test_non_lora_tensors_are_averaged_and_load_as_modules_to_save(base_model, tmp_path):
    models = [train_adapter(base_model, t, steps=2, modules_to_save=["lm_head"]) for t in range(2)]
    merged = rk.merge(models, out=str(tmp_path / "m"))
    heads = [get_peft_model_state_dict(m)["base_model.model.lm_head.weight"] for m in models]
    torch.testing.assert_close(merged["base_model.model.lm_head.weight"], (heads[0] + heads[1]) / 2)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "m"))
    lm_head = loaded.base_model.model.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(lm_head, merged["base_model.model.lm_head.weight"])


def test_adapter_name_inside_keys_and_embedding_factors():
    sd, config = lora_pair(3)
    renamed = {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in sd.items()}
    from_renamed, plain = rk.merge([renamed]), rk.merge([sd])
    assert from_renamed.keys() == plain.keys()
    assert all(torch.equal(from_renamed[k], plain[k]) for k in plain)
    g = torch.Generator().manual_seed(0)
    a_key, b_key = "base_model.model.embed_tokens.lora_embedding_A", "base_model.model.embed_tokens.lora_embedding_B"
    emb = {a_key: torch.randn(4, 50, generator=g), b_key: torch.randn(16, 4, generator=g)}  # A [r, vocab], B [dim, r]
    second = {a_key: torch.randn(4, 50, generator=g) * 0.5, b_key: -2 * emb[b_key]}
    ref = robustmerge_module([emb[a_key], second[a_key]], [emb[b_key], second[b_key]], rk.RobustMergeParams())
    exact = rk.merge([emb, second], backend="reference")
    assert set(exact) == set(emb)  # saved under the embedding names, without ".weight"
    assert torch.equal(exact[a_key], ref.a) and torch.equal(exact[b_key], ref.b)
    merged = rk.merge([emb, second])  # the default (kernel) backend: within float32 tolerance
    assert set(merged) == set(emb)
    for key, want in ((a_key, ref.a), (b_key, ref.b)):
        assert_close_to_exact(merged[key], want.double(), torch.float32, float(want.abs().max()), 2.0, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtype_defaults_and_can_be_chosen(dtype):
    """LoRA factors of fp16/bf16 inputs default to float32 (as the official code writes
    them); averaged non-LoRA tensors keep their dtype; dtype= sets every tensor."""
    pairs = [lora_pair(i, dtype=dtype) for i in range(3)]
    for sd, _ in pairs:
        sd["base_model.model.model.mm_projector.0.bias"] = torch.randn(6).to(dtype)
    factors = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    merged = rk.merge(pairs)
    assert {k: v.dtype for k, v in merged.items() if "lora_" in k} == dict.fromkeys(
        (k for k in merged if "lora_" in k), factors
    )
    assert merged["base_model.model.model.mm_projector.0.bias"].dtype == dtype
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
    assert merged.report.output_dtypes == {"lora_factors": names[factors], "averaged": names[dtype]}
    chosen = rk.merge(pairs, dtype="bf16")
    assert all(v.dtype == torch.bfloat16 for v in chosen.values())
    assert chosen.report.output_dtypes == {"lora_factors": "bfloat16", "averaged": "bfloat16"}
    # the half-precision default is the float32 computation itself, not a rounded copy
    if dtype in (torch.bfloat16, torch.float16):
        up = rk.merge([({k: v.float() for k, v in sd.items()}, cfg) for sd, cfg in pairs])
        assert all(torch.equal(merged[k], up[k]) for k in merged if "lora_" in k)


def test_merged_bf16_adapter_loads_in_peft(tmp_path):
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    pairs = []
    for seed in range(2):
        sd = train_adapter(base, seed, steps=2, target_modules=["q_proj"])
        pairs.append(({k: v.bfloat16() for k, v in get_peft_model_state_dict(sd).items()}, config))
    out = tmp_path / "bf16"
    merged = rk.merge(pairs, out=str(out), dtype="bf16")  # half-precision output is opt-in (default: fp32)
    assert merged.keys() == pairs[0][0].keys() and all(v.dtype == torch.bfloat16 for v in merged.values())
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert stored.keys() == merged.keys() and all(torch.equal(stored[k], merged[k]) for k in merged)
    # the merged factors are RobustMerge of the bf16 inputs (within bf16 rounding)
    names = sorted({k.removesuffix(".lora_A.weight") for k in merged if k.endswith(".lora_A.weight")})
    assert len(names) == 2  # q_proj in 2 layers
    for name in names:
        res = robustmerge_module([sd[f"{name}.lora_A.weight"] for sd, _ in pairs],
                                 [sd[f"{name}.lora_B.weight"] for sd, _ in pairs], rk.RobustMergeParams())  # fmt: skip
        for factor, want in (("A", res.a), ("B", res.b)):
            key = f"{name}.lora_{factor}.weight"
            assert_close_to_exact(merged[key], want.double(), torch.bfloat16, float(want.abs().max()), 2.0, key)
    loaded = PeftModel.from_pretrained(base, str(out))
    scaling = merged.config["lora_alpha"] / merged.config["r"]
    for name in names:  # peft loaded exactly the stored values (into its float32 layers)
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight.detach().bfloat16(), merged[f"{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B["default"].weight.detach().bfloat16(), merged[f"{name}.lora_B.weight"])
    assert max_delta_error(loaded, merged, scaling) < 1e-6


def test_backend_registry_and_environment_override(monkeypatch):
    assert rk.available_backends("cpu")["reference"] == "ok"
    assert rk.get_backend("auto", "cpu").name in rk.available_backends("cpu")
    monkeypatch.setenv("ROBUSTMERGE_BACKEND", "reference")
    assert rk.merge([lora_pair(0)]).report.backend == "reference"
    monkeypatch.setenv("ROBUSTMERGE_BACKEND", "nonexistent")
    with pytest.raises(rk.AdapterError, match="unknown backend 'nonexistent'"):
        rk.merge([lora_pair(0)])
    monkeypatch.delenv("ROBUSTMERGE_BACKEND")
    with pytest.raises(rk.AdapterError, match="unknown backend"):
        rk.merge([lora_pair(0)], backend="tpu-magic")


def _header_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_plan_pairs_every_module_and_counts_its_bytes(adapter_dirs):
    from robustmerge_kernels.adapter_io.sources import open_adapter
    from robustmerge_kernels.plan import build_plan

    plan = build_plan([open_adapter(d, i) for i, d in enumerate(adapter_dirs)])
    assert len(plan.modules) == 14  # 2 layers x 7 Llama projections
    down = next(m for m in plan.modules if m.name.endswith("layers.0.mlp.down_proj"))
    assert down.members == (0, 1, 2) and (down.rank, down.in_features, down.out_features) == (4, 128, 64)
    assert plan.bytes_in() == sum(
        os.path.getsize(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs
    ) - sum(_header_bytes(os.path.join(d, "adapter_model.safetensors")) for d in adapter_dirs)


def test_baseline_methods_resolve_no_backend():
    """A backend is resolved only where one is used: baselines run on torch, so naming a
    GPU-only backend for them (or an unknown one) is not an error, and the report says so."""
    pairs = [lora_pair(s) for s in range(2)]
    merged = rk.merge(pairs, method="ties", backend="triton")
    assert merged.report.backend == "methods"
    expected = rk.merge(pairs, method="ties")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
