"""Adapters from every trainer in, a correct adapter out: LLaVA layouts, scaling patterns,
malformed files and interrupted writes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import robustmerge_kernels as rk
from robustmerge_kernels.demo import max_delta_error
from robustmerge_kernels.demo.toy import train_adapter

PROJ = "base_model.model.model.mm_projector"


def _with_projector(folder: str, seed: int) -> dict[str, torch.Tensor]:
    """Turn a PEFT folder into an original LLaVA checkpoint: add non_lora_trainables.bin."""
    g = torch.Generator().manual_seed(seed)
    proj = {f"{PROJ}.0.weight": torch.randn(8, 6, generator=g), f"{PROJ}.0.bias": torch.randn(8, generator=g),
            f"{PROJ}.2.weight": torch.randn(8, 8, generator=g)}  # fmt: skip
    torch.save(proj, os.path.join(folder, "non_lora_trainables.bin"))
    return proj


def test_original_llava_checkpoint_projector_averaged_and_written_back(adapter_dirs, base_model, tmp_path):
    folders = [shutil.copytree(d, tmp_path / f"llava{i}") for i, d in enumerate(adapter_dirs[:2])]
    projs = [_with_projector(str(f), i) for i, f in enumerate(folders)]
    out = tmp_path / "merged"
    merged = rk.merge([str(f) for f in folders], out=str(out))
    written = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert set(written) == set(projs[0])
    for key in written:
        torch.testing.assert_close(written[key], (projs[0][key] + projs[1][key]) / 2)
        assert torch.equal(written[key], merged[key])
    assert not any("mm_projector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
    assert max_delta_error(loaded, merged, merged.config["lora_alpha"] / merged.config["r"]) == 0.0
    record = (out / "robustmerge.json").read_text()
    assert "non_lora_trainables.bin" in record  # hashed as an input file


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=63,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def _llava_adapter(base, seed: int, **kw):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                        init_lora_weights=False, **kw)  # fmt: skip
    return get_peft_model(copy.deepcopy(base), config)


def test_hugging_face_llava_adapters_merge_and_load(tmp_path):
    base = tiny_llava()
    folders = []
    for seed in range(2):
        model = _llava_adapter(base, seed)
        model.save_pretrained(str(tmp_path / f"hf{seed}"))
        folders.append(str(tmp_path / f"hf{seed}"))
    keys = load_file(os.path.join(folders[0], "adapter_model.safetensors"))
    assert any(".language_model." in k for k in keys)  # really the HF LLaVA layout
    out = tmp_path / "merged"
    merged = rk.merge(folders, out=str(out))
    assert merged.report.modules == 4  # q_proj and v_proj in 2 layers
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    assert max_delta_error(loaded, merged, 2.0) == 0.0
    assert sum(isinstance(m, torch.nn.Module) and hasattr(m, "lora_A") for m in loaded.modules()) == 4


def test_hf_and_original_llava_layouts_pair_by_module(tmp_path):
    base = tiny_llava()
    sds = [get_peft_model_state_dict(_llava_adapter(base, seed)) for seed in range(2)]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    as_original = {k.replace("model.language_model.", "model."): v for k, v in sds[1].items()}
    assert as_original.keys() != sds[1].keys()
    same = rk.merge([(sds[0], config), (sds[1], config)])
    mixed = rk.merge([(sds[0], config), (as_original, config)])
    assert mixed.keys() == same.keys()  # named as the first adapter names them
    assert mixed.report.partial_modules == {}
    assert all(torch.equal(mixed[k], same[k]) for k in same)


def test_rank_and_alpha_patterns(base_model, tmp_path):
    """Per-module r and alpha: scaling per module, the output config keeps the patterns."""
    kw = dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 32})
    models = [train_adapter(base_model, t, steps=2, **kw) for t in range(2)]
    other = train_adapter(base_model, 2, steps=2, r=4, lora_alpha=4, rank_pattern={"down_proj": 8})
    out = tmp_path / "m"
    merged = rk.merge([*models, other], out=str(out))
    assert merged.config["rank_pattern"] == {"down_proj": 8} and merged.config["alpha_pattern"] == {"down_proj": 32}
    name = "base_model.model.model.layers.0.mlp.down_proj"
    assert merged[f"{name}.lora_A.weight"].shape[0] == 8
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
    assert loaded.get_submodule(name).scaling["default"] == 32 / 8
    assert max_delta_error(loaded, merged, 8 / 4) > 0  # q_proj uses 8/4, down_proj 32/8: check each
    layer = loaded.get_submodule(name)
    delta = (merged[f"{name}.lora_B.weight"] @ merged[f"{name}.lora_A.weight"]) * 4.0
    torch.testing.assert_close(layer.get_delta_weight("default"), delta)
    # the third adapter's down_proj (alpha 4, r 8 -> 0.5) is folded at 0.5 / 4 into B
    from robustmerge_kernels.adapter_io.sources import open_adapter
    from robustmerge_kernels.plan import build_plan

    srcs = [open_adapter(m, i) for i, m in enumerate([*models, other])]
    plan = build_plan(srcs)
    down = next(m for m in plan.modules if m.name == name)
    q = next(m for m in plan.modules if m.name.endswith("layers.0.self_attn.q_proj"))
    assert down.b_scale == (1.0, 1.0, 0.125) and q.b_scale == (1.0, 1.0, 0.5)


# ---------------------------------------------------------------------------- fuzzing


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzzed_files_merge_or_fail_cleanly(adapter_dirs, tmp_path_factory, data):
    """Truncated, bit-flipped or spliced files: either a correct merge or an AdapterError,
    never another exception, and never an output folder after a failure."""
    tmp = tmp_path_factory.mktemp("fuzz")
    bad = shutil.copytree(adapter_dirs[1], tmp / "bad")
    path = bad / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    action = data.draw(st.sampled_from(["truncate", "flip", "header_len", "splice"]))
    if action == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif action == "header_len":
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    else:
        at = data.draw(st.integers(8, len(raw) - 1))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    path.write_bytes(bytes(raw))
    out = tmp / "out"
    try:
        merged = rk.merge([adapter_dirs[0], str(bad)], out=str(out))
    except rk.AdapterError as exc:
        assert exc.adapter is not None and "#1" in exc.adapter, str(exc)
        assert not out.exists()
    else:
        assert (out / "adapter_model.safetensors").exists() and len(merged) > 0
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "tensors,message",
    [
        (
            {"m.lora_A.weight": torch.ones(2, 3, dtype=torch.int32), "m.lora_B.weight": torch.ones(4, 2)},
            "not a floating-point",
        ),
        ({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 3)}, "rank mismatch"),
        ({"m.lora_A.weight": torch.ones(2, 3, 1), "m.lora_B.weight": torch.ones(4, 2)}, "2-D"),
        ({"m.lora_A.weight": torch.ones(0, 3), "m.lora_B.weight": torch.ones(4, 0)}, "empty LoRA factor"),
        ({"something.else": torch.ones(3)}, "contains no lora_A/lora_B"),
    ],
)
def test_malformed_adapter_files(tmp_path, tensors, message):
    folder = tmp_path / "a"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    with pytest.raises(rk.AdapterError, match=message):
        rk.merge([str(folder)], out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_duplicate_keys_in_safetensors_header(adapter_dirs, tmp_path):
    bad = shutil.copytree(adapter_dirs[0], tmp_path / "dup")
    path = bad / "adapter_model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entries = list(json.loads(raw[8 : 8 + n]).items())
    key, entry = next((k, v) for k, v in entries if k != "__metadata__")
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*entries, (key, entry)])  # key twice
    new = ("{" + body + "}").encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    with pytest.raises(rk.AdapterError, match="duplicate key"):
        rk.merge([str(bad)], out=str(tmp_path / "out"))


# ---------------------------------------------------------------------------- interruption


def test_killed_during_write_leaves_no_complete_looking_folder(adapter_dirs, tmp_path):
    """SIGKILL while the weights are being written: the output name never appears; a
    hidden temp folder may remain, and the next merge to the same output succeeds."""
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        import time, sys
        import robustmerge_kernels.adapter_io.writer as w
        real = w._write_json
        def slow(path, data):  # a slow disk: stall after the weights, writing the config
            real(path, data)
            print("WRITING", flush=True)
            time.sleep(60)
        w._write_json = slow
        import robustmerge_kernels as rk
        rk.merge({adapter_dirs!r}, out={str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".merged.tmp-") for name in leftovers) and leftovers
    rk.merge(adapter_dirs, out=str(out))
    assert (out / "adapter_config.json").exists()


def test_sharded_output_with_index_reads_back_as_input(adapter_dirs, tmp_path):
    out = tmp_path / "sharded"
    merged = rk.merge(adapter_dirs, out=str(out), max_shard_size="20KB")
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("adapter_model-"))
    assert len(shards) > 1 and shards[0] == f"adapter_model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "adapter_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    from robustmerge_kernels.adapter_io.sources import open_adapter

    source = open_adapter(str(out), 0)
    try:
        assert set(source.keys()) == set(merged) and all(torch.equal(source.get(k), merged[k]) for k in merged)
    finally:
        source.close()
    again = rk.merge([str(out), adapter_dirs[0]])  # sharded adapters are valid inputs
    assert again.keys() == merged.keys()
    single = tmp_path / "single"
    rk.merge(adapter_dirs, out=str(single), max_shard_size="1GB")  # small adapter: one file, no index
    assert sorted(p.name for p in single.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "robustmerge.json",
    ]
    with pytest.raises(rk.AdapterError, match="cannot read size"):
        rk.merge(adapter_dirs, out=str(tmp_path / "x"), max_shard_size="lots")


def test_streamed_output_is_a_valid_safetensors_file_and_can_skip_memory(adapter_dirs, base_model, tmp_path):
    """RobustMerge output is written as produced into a pre-sized file: it must read back
    with safetensors and peft, equal the in-memory result, and keep_in_memory=False must
    return no tensors."""
    in_memory = rk.merge(adapter_dirs)
    out = tmp_path / "streamed"
    lean = rk.merge(adapter_dirs, out=str(out), keep_in_memory=False)
    assert len(lean) == 0 and lean.report.parameters == sum(v.numel() for v in in_memory.values())
    written = load_file(str(out / "adapter_model.safetensors"))
    assert written.keys() == in_memory.keys() and all(torch.equal(written[k], in_memory[k]) for k in written)
    raw = (out / "adapter_model.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # data 8-byte aligned, as safetensors writes it
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
    assert max_delta_error(loaded, in_memory, in_memory.config["lora_alpha"] / in_memory.config["r"]) == 0.0
