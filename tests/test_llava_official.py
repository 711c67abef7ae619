"""The merged folder as a drop-in for the official RobustMerge/LLaVA pipeline.

Original-LLaVA LoRA folders (adapter_model.bin with ``model.layers`` keys,
adapter_config.json, config.json: the LlavaConfig, non_lora_trainables.bin: the
mm_projector) are merged through the CLI and compared with a float64 evaluation of the
official merge loop's formula (AuroraZengfh/RobustMerge, llava/model/builder.py,
``load_and_merge_pretrained_model``), transcribed below in our own words.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels import reference
from robustmerge_kernels.cli import main
from robustmerge_kernels.params import RobustMergeParams

PEFT = "base_model.model."
PROJ = f"{PEFT}model.mm_projector"
# module -> (in_features, out_features); rank 8, as a small LLaVA LoRA
SHAPES = {
    f"model.layers.{i}.self_attn.{p}": (64, 48 if p == "v_proj" else 64) for i in range(2) for p in ("q_proj", "v_proj")
}
RANK = 8


def llava_config_json(**changes) -> dict:
    """A config.json as LLaVA's training script saves it beside a LoRA adapter."""
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 64,
              "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_use_im_start_end": False, "image_aspect_ratio": "pad", "torch_dtype": "bfloat16"}  # fmt: skip
    config.update(changes)
    return config


def write_original_llava(folder, seed: int, dtype: torch.dtype, shapes=SHAPES, config_json: dict | None = None,
                         projector: bool = True, target_modules=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:  # fmt: skip
    """An original-LLaVA LoRA folder; returns every tensor it holds (both files)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for module, (n, m) in shapes.items():  # A before B per module, as PEFT saves them
        lora[f"{PEFT}{module}.lora_A.weight"] = (
            (torch.rand(RANK, n, generator=g, dtype=torch.float64) * 2 - 1) / n**0.5
        ).to(dtype)
        lora[f"{PEFT}{module}.lora_B.weight"] = (torch.randn(m, RANK, generator=g, dtype=torch.float64) * 0.02).to(
            dtype
        )
    torch.save(lora, os.path.join(folder, "adapter_model.bin"))
    adapter_config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(target_modules),
                      "task_type": "CAUSAL_LM", "lora_dropout": 0.05, "bias": "none"}  # fmt: skip
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json or llava_config_json(), f, indent=2)
    tensors = dict(lora)
    if projector:
        proj = {f"{PROJ}.0.weight": torch.randn(64, 32, generator=g, dtype=torch.float64).to(dtype),
                f"{PROJ}.0.bias": torch.randn(64, generator=g, dtype=torch.float64).to(dtype),
                f"{PROJ}.2.weight": torch.randn(64, 64, generator=g, dtype=torch.float64).to(dtype)}  # fmt: skip
        torch.save(proj, os.path.join(folder, "non_lora_trainables.bin"))
        tensors.update(proj)
    return tensors


def official_masks(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Per task, |x| >= the k-th smallest |x| of the whole matrix, k = int(N (1 - density))."""
    flat = stack.abs().reshape(stack.shape[0], -1)
    kth = flat.kthvalue(int(flat.shape[1] * (1 - density)), dim=1, keepdim=True).values
    return (flat >= kth).reshape(stack.shape)


def official_formula(a_list, b_list, density=0.2, clamp_ratio=0.2, fuse=2.0):
    """The official loop's formula, evaluated in float64 on the stored values: masks per
    task; s = row sum of |A| / row sum of kept |A|; s clamped per task to [sorted s at
    index int(r (1 - clamp_ratio)), max s]; A* = sum fuse kept A; B* = sum fuse s kept B / sum s."""
    a = torch.stack([x.double() for x in a_list])
    b = torch.stack([x.double() for x in b_list])
    mask_a, mask_b = official_masks(a, density), official_masks(b, density)
    s = a.abs().sum(-1) / (a * mask_a).abs().sum(-1)
    assert torch.isfinite(s).all()  # no row without kept mass (there the official code gives NaN)
    ordered = s.sort(dim=1).values
    r = s.shape[1]
    s = torch.clamp(s, ordered[:, int(r * (1 - clamp_ratio))][:, None], ordered[:, r - 1][:, None])
    merged_a = (fuse * a * mask_a).sum(0)
    merged_b = (fuse * s[:, None, :] * b * mask_b).sum(0) / s[:, None, :].sum(0)
    return merged_a, merged_b, mask_a, mask_b


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_original_llava_merge_is_float32_and_exact(tmp_path, dtype):
    """Item: official LLaVA folders in bf16/fp16 give float32 factors within 1e-6 of the
    float64 official formula, with identical masks; the projector stays in the inputs' dtype."""
    folders = [str(tmp_path / f"task{t}") for t in range(3)]
    inputs = [write_original_llava(f, t, dtype) for t, f in enumerate(folders)]
    out = str(tmp_path / "merged")
    assert main(["merge", *folders, "-o", out, "-q"]) == 0
    merged = load_file(os.path.join(out, "adapter_model.safetensors"))
    record = json.loads(open(os.path.join(out, "robustmerge.json")).read())
    name = str(dtype).removeprefix("torch.")
    assert record["output_dtypes"] == {"lora_factors": "float32", "averaged": name}
    as_input = rk.merge(folders, dtype=dtype)  # the old default: rounded to the input dtype
    worst, worst_half = 0.0, 0.0
    for module in SHAPES:
        ka, kb = f"{PEFT}{module}.lora_A.weight", f"{PEFT}{module}.lora_B.weight"
        a, b = [x[ka] for x in inputs], [x[kb] for x in inputs]
        exact_a, exact_b, mask_a, mask_b = official_formula(a, b)
        # masks: the official loop's (kthvalue in the input dtype) = float64's = this library's
        assert torch.equal(official_masks(torch.stack(a), 0.2), mask_a)
        assert torch.equal(official_masks(torch.stack(b), 0.2), mask_b)
        ours = reference.robustmerge_module(a, b, RobustMergeParams())
        assert torch.equal(ours.mask_a, mask_a) and torch.equal(ours.mask_b, mask_b)
        assert merged[ka].dtype == merged[kb].dtype == torch.float32
        assert torch.equal(merged[ka] == 0, exact_a == 0)
        for got, exact, half in ((merged[ka], exact_a, as_input[ka]), (merged[kb], exact_b, as_input[kb])):
            worst = max(worst, relative_error(got, exact))
            worst_half = max(worst_half, relative_error(half, exact))
    assert worst <= 1e-6, worst
    assert worst_half > 100 * worst  # why float32: the half-precision copy is far less accurate
    projector = torch.load(os.path.join(out, "non_lora_trainables.bin"), weights_only=True)
    for key, value in projector.items():
        assert value.dtype == dtype
        exact = sum(x[key].double() for x in inputs) / 3
        assert torch.equal(value, exact.to(dtype)), key  # float64 sum, rounded once


def test_config_json_round_trips(tmp_path, capsys):
    """LLaVA's load_pretrained_model reads LlavaConfig.from_pretrained(<merged folder>): the
    inputs' config.json is carried over (identical: the same bytes; different: the first's,
    and the report and the CLI say so)."""
    from transformers import PretrainedConfig

    folders = [str(tmp_path / f"task{t}") for t in range(3)]
    for t, f in enumerate(folders):
        write_original_llava(f, t, torch.float32)
    out = tmp_path / "same"
    merged = rk.merge(folders, out=str(out))
    assert (out / "config.json").read_bytes() == (tmp_path / "task0" / "config.json").read_bytes()
    assert merged.report.model_config == {"file": "config.json", "from": f"#0 ({folders[0]})"}
    loaded = PretrainedConfig.from_pretrained(str(out))  # as LlavaConfig (a LlamaConfig) reads it
    assert loaded.mm_projector_type == "mlp2x_gelu" and loaded.architectures == ["LlavaLlamaForCausalLM"]
    record = json.loads((out / "robustmerge.json").read_text())
    assert (
        "config.json" in record["inputs"][1]["sha256"]
        and record["model_config"]["from"] == merged.report.model_config["from"]
    )
    # a merged folder is a valid input again, config.json and all
    again = rk.merge([str(out), folders[1]], out=str(tmp_path / "again"))
    assert again.report.model_config["from"].startswith("#0") and "differs" not in again.report.model_config

    write_original_llava(folders[2], 2, torch.float32, config_json=llava_config_json(image_aspect_ratio="square"))
    out = tmp_path / "different"
    capsys.readouterr()
    assert main(["merge", *folders, "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert (out / "config.json").read_bytes() == (tmp_path / "task0" / "config.json").read_bytes()
    record = json.loads((out / "robustmerge.json").read_text())
    assert record["model_config"]["differs"] == [f"#2 ({folders[2]})"]
    assert record["model_config"]["differing_keys"] == ["image_aspect_ratio"]
    assert "config.json written from #0" in printed and "image_aspect_ratio" in printed

    # folders without config.json (plain PEFT adapters) write none
    for f in folders:
        os.remove(os.path.join(f, "config.json"))
    rk.merge(folders, out=str(tmp_path / "none"))
    assert not (tmp_path / "none" / "config.json").exists()
    bad = tmp_path / "task0" / "config.json"
    bad.write_text("[1, 2]")
    with pytest.raises(rk.AdapterError, match="config.json is not a JSON object") as info:
        rk.merge(folders, out=str(tmp_path / "bad"))
    assert info.value.adapter == f"#0 ({folders[0]})" and not (tmp_path / "bad").exists()


def _tiny_llava_adapters(tmp_path):
    """One Hugging Face LLaVA adapter (o_proj) and one original-LLaVA folder (o_proj and
    gate_proj, projector in non_lora_trainables.bin) for the same tiny LlavaForConditionalGeneration."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from test_formats import tiny_llava

    base = tiny_llava()
    torch.manual_seed(1)
    hf = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False)
    )
    hf.save_pretrained(str(tmp_path / "hf"))
    torch.manual_seed(2)
    targets = ["o_proj", "gate_proj"]  # the language model's only: CLIP has neither
    orig = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    folder = tmp_path / "orig"
    folder.mkdir()
    state = {k.replace("model.language_model.", "model."): v for k, v in get_peft_model_state_dict(orig).items()}
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets})
    )
    own = base.model.multi_modal_projector.state_dict()
    projector = {
        f"{PROJ}.{ {'linear_1': 0, 'linear_2': 2}[k.split('.')[0]] }.{k.split('.')[1]}": torch.randn_like(v)
        for k, v in own.items()
    }
    torch.save(projector, folder / "non_lora_trainables.bin")
    return base, str(tmp_path / "hf"), str(folder), projector


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}


def test_mixed_layouts_write_one_layout_that_loads(tmp_path):
    """An HF-layout adapter lacking gate_proj merged with an original-layout one that has it:
    every output key in the first adapter's layout (the projector too), and every LoRA
    module of the loaded model non-zero (gate_proj once landed under an original name and
    stayed zero in PEFT)."""
    from peft import PeftModel

    from robustmerge_kernels.adapter_io.keys import layout_of
    from robustmerge_kernels.eval.model import attach_adapter

    base, hf, orig, projector = _tiny_llava_adapters(tmp_path)
    out = tmp_path / "hf_first"
    merged = rk.merge([hf, orig], out=str(out))
    assert merged.report.layout == "hf" and len(merged.report.partial_modules) == 2  # gate_proj, 2 layers
    written = load_file(str(out / "adapter_model.safetensors"))
    assert {layout_of(k) for k in written} == {"hf"} and not (out / "non_lora_trainables.bin").exists()
    assert sum("gate_proj" in k for k in written) == 4 and sum("multi_modal_projector" in k for k in written) == 4
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    layers = _lora_layers(loaded)
    assert len(layers) == 4 and all("language_model" in name for name in layers)
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.abs().sum() > 0 and b.abs().sum() > 0, name
        key = name.removeprefix("base_model.model.")
        assert torch.equal(a, written[f"base_model.model.{key}.lora_A.weight"]), name
    # the projector (carried by one adapter: its mean is itself) is loaded into the model by PEFT
    assert torch.equal(
        loaded.base_model.model.model.multi_modal_projector.linear_1.weight, projector[f"{PROJ}.0.weight"]
    )

    out = tmp_path / "original_first"
    merged = rk.merge([orig, hf], out=str(out))
    assert merged.report.layout == "original"
    written = load_file(str(out / "adapter_model.safetensors"))
    extra = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert {layout_of(k) for k in [*written, *extra]} == {"original"} and set(extra) == set(projector)
    model = attach_adapter(copy.deepcopy(base), str(out), merge=False)  # the original-layout loader
    layers = _lora_layers(model)
    assert len(layers) == 4
    for name, layer in layers.items():
        assert layer.lora_A["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.abs().sum() > 0, name
