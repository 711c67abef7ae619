"""End to end, offline: a tiny LlavaForConditionalGeneration with a locally built tokenizer
and processor, generated images and questions for every task type, two LoRA adapters
merged with RobustMerge, then ``robustmerge eval`` / ``eval-report`` on them."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")

from robustmerge_kernels.eval import runner  # noqa: E402
from robustmerge_kernels.eval.model import convert_original_state_dict, load_model  # noqa: E402
from robustmerge_kernels.eval.prompts import VICUNA_V1_SYSTEM, build_prompt  # noqa: E402
from robustmerge_kernels.eval.tasks import load_registry  # noqa: E402

WORDS = ("USER ASSISTANT : . , ? ! ' A B C D E the a is of what answer with option letter from given choices "
         "directly this image dog cat red blue box caption describe briefly table number yes no 0 1 2 3 4 5 6 7 8 9 "
         "[ ] Unanswerable chat between curious user and an artificial intelligence assistant The gives helpful "
         "detailed polite answers to user's questions Choose below").split()  # fmt: skip
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=4, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)  # fmt: skip


def tiny_llava(processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


# Per task type: (question text, answer) generators; images are random RGB of varied sizes.
def _questions(task, n):
    out = []
    for i in range(n):
        if task.scorer == "scienceqa":
            text, ans = (
                "What is this ?\nA. dog\nB. cat\nAnswer with the option's letter from the given choices directly.",
                "AB"[i % 2],
            )
        elif task.scorer == "rec":
            text, ans = "box of the red dog", "[0.1, 0.2, 0.5, 0.6]"
        elif task.scorer == "caption":
            text, ans = "describe this image briefly .", ["a red dog", "the dog is red"]
        elif task.scorer == "substring":
            text, ans = "What is this image ?\nanswer with the option", "dog"
        else:
            text, ans = "what number is this ?", str(i)
        q = {"question_id": f"{task.name}-{i}", "image": f"{task.name}/{i}.png", "text": text, "answer": ans}
        out.append(q)
    return out


def make_bench(root, registry, tasks, n=3):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for name in tasks:
        task = registry.tasks[name]
        qs = _questions(task, n)
        qpath = os.path.join(root, task.question_file)
        os.makedirs(os.path.dirname(qpath), exist_ok=True)
        with open(qpath, "w") as f:
            json.dump(qs, f)
        for i, q in enumerate(qs):
            ipath = os.path.join(root, registry.image_root, q["image"])
            os.makedirs(os.path.dirname(ipath), exist_ok=True)
            w, h = 8 + 4 * i, 8 + 2 * (i % 2)
            pix = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pix).save(ipath)
        if task.references:  # COCO-format references, matched by position (image_id 1..N)
            anns = [{"image_id": i + 1, "id": 10 * i + j, "caption": c} for i, q in enumerate(qs)
                    for j, c in enumerate(q["answer"])]  # fmt: skip
            with open(os.path.join(root, task.references), "w") as f:
                json.dump({"annotations": anns, "images": [{"id": i + 1} for i in range(n)]}, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base, two saved HF-layout adapters and their RobustMerge merge."""
    from peft import LoraConfig, get_peft_model

    import robustmerge_kernels as rk

    root = tmp_path_factory.mktemp("eval")
    processor = build_processor()
    base = tiny_llava(processor)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    adapters = []
    for seed in range(2):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                         target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")  # fmt: skip
        model = get_peft_model(copy.deepcopy(base), cfg)
        for p in model.parameters():
            if p.requires_grad:
                p.data *= 20  # large enough that the adapter changes generations
        model.save_pretrained(root / f"adapter{seed}")
        adapters.append(str(root / f"adapter{seed}"))
    merged = root / "merged"
    rk.merge(adapters, out=str(merged))
    return {"root": root, "base": str(base_dir), "adapters": adapters, "merged": str(merged), "model": base}


def test_prompt_is_llava_v1_5_vicuna_v1():
    assert build_prompt("What?") == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat? ASSISTANT:"


@pytest.mark.slow
def test_end_to_end_eval_merged_adapter_and_report(tiny, tmp_path):
    from robustmerge_kernels.cli import main

    reg = load_registry()
    # No caption task: METEOR's JVM start costs more than the rest of this test, and the
    # caption scorer is covered by tests/test_eval_scorers.py.
    tasks = ["scienceqa", "imagenet", "grounding", "ocrvqa", "tabmwp"]
    data = tmp_path / "bench"
    make_bench(str(data), reg, tasks)
    common = ["--data-root", str(data), "--tasks", *tasks, "--batch-size", "2", "--max-new-tokens", "6", "-q",
              "--device", "cpu"]  # fmt: skip
    runs = {"zero": tmp_path / "zero", "ind": tmp_path / "ind", "merged": tmp_path / "merged"}
    assert main(["eval", "--base", tiny["base"], "--out", str(runs["zero"]), *common]) == 0
    assert main(["eval", "--base", tiny["base"], "--adapter", tiny["adapters"][0], "--adapter-task", "scienceqa",
                 "--out", str(runs["ind"]), *common]) == 0  # fmt: skip
    assert (
        main(["eval", "--base", tiny["base"], "--adapter", tiny["merged"], "--out", str(runs["merged"]), *common]) == 0
    )
    for name in tasks:
        answers = [json.loads(x) for x in open(runs["merged"] / name / "answers.jsonl")]
        assert len(answers) == 3 and {a["question_id"] for a in answers} == {f"{name}-{i}" for i in range(3)}
        res = json.load(open(runs["merged"] / name / "results.json"))
        assert res["n"] == 3 and 0 <= res["score"]
    zero = [json.loads(x)["text"] for x in open(runs["zero"] / "tabmwp" / "answers.jsonl")]
    merged = [json.loads(x)["text"] for x in open(runs["merged"] / "tabmwp" / "answers.jsonl")]
    assert zero != merged  # the adapter is really applied
    assert json.load(open(runs["merged"] / "run.json"))["label"] == "robustmerge"

    out = tmp_path / "report" / "table"
    assert main(["eval-report", *map(str, runs.values()), "-o", str(out)]) == 0
    md = (tmp_path / "report" / "table.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| method | ScienceQA | ImageNet | REC-COCO | OCRVQA | TabMWP | seen mean")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["zero-shot", "individual", "robustmerge"]
    assert "*" in lines[2]  # seen mean over 4 of 8 seen tasks is marked incomplete
    assert (tmp_path / "report" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["vqav2"], n=5)
    kw = dict(batch_size=2, max_new_tokens=4, quiet=True, device="cpu")
    full = runner.evaluate(tiny["base"], tiny["merged"], ["vqav2"], str(data), str(tmp_path / "full"), **kw)

    calls, armed = [], [True]
    real = runner.generate_batch

    def flaky(model, processor, prompts, images, n):
        calls.append(len(prompts))
        if armed[0] and len(calls) == 2:
            raise Interrupted  # interrupted after the first batch was written
        return real(model, processor, prompts, images, n)

    monkeypatch.setattr(runner, "generate_batch", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        runner.evaluate(tiny["base"], tiny["merged"], ["vqav2"], str(data), str(out), **kw)
    path = out / "vqav2" / "answers.jsonl"
    assert len(path.read_text().splitlines()) == 2 and not (out / "vqav2" / "results.json").exists()
    with open(path, "a") as f:
        f.write('{"question_id": "vqav2-2", "te')  # a torn line, as a crash mid-write leaves it
    calls.clear()
    armed[0] = False
    resumed = runner.evaluate(tiny["base"], tiny["merged"], ["vqav2"], str(data), str(out), **kw)
    assert calls == [2, 1]  # only the 3 unanswered questions were generated
    assert resumed == full
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [f"vqav2-{i}" for i in range(5)]
    calls.clear()
    again = runner.evaluate(tiny["base"], tiny["merged"], ["vqav2"], str(data), str(out), **kw)
    assert calls == [] and again == full


def test_original_llava_adapter_converted_on_load(tiny, tmp_path):
    """An original-LLaVA checkpoint (model.layers..., mm_projector in non_lora_trainables.bin)
    gives the same model as the equivalent HF-layout adapter plus projector weights."""
    from safetensors.torch import load_file, save_file

    src = tiny["adapters"][1]
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    orig = {k.replace("model.language_model.", "model."): v for k, v in sd.items()}
    assert orig.keys() != sd.keys()
    folder = tmp_path / "orig"
    folder.mkdir()
    save_file(orig, str(folder / "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    cfg["target_modules"] = ["q_proj", "v_proj", "down_proj"]  # as LLaVA's trainer writes it
    json.dump(cfg, open(folder / "adapter_config.json", "w"))
    g = torch.Generator().manual_seed(3)
    proj = {"base_model.model.model.mm_projector.0.weight": torch.randn(32, 16, generator=g),
            "base_model.model.model.mm_projector.0.bias": torch.randn(32, generator=g),
            "base_model.model.model.mm_projector.2.weight": torch.randn(32, 32, generator=g),
            "base_model.model.model.mm_projector.2.bias": torch.randn(32, generator=g)}  # fmt: skip
    torch.save(proj, folder / "non_lora_trainables.bin")

    lora, projector = convert_original_state_dict({**orig, **proj}, "model.language_model.")
    assert set(lora) == set(sd) and set(projector) == {
        "linear_1.weight",
        "linear_1.bias",
        "linear_2.weight",
        "linear_2.bias",
    }

    converted, _ = load_model(tiny["base"], str(folder), dtype="fp32")
    reference, _ = load_model(tiny["base"], src, dtype="fp32")
    mmp = reference.model.multi_modal_projector
    with torch.no_grad():
        mmp.linear_1.weight.copy_(proj["base_model.model.model.mm_projector.0.weight"])
        mmp.linear_1.bias.copy_(proj["base_model.model.model.mm_projector.0.bias"])
        mmp.linear_2.weight.copy_(proj["base_model.model.model.mm_projector.2.weight"])
        mmp.linear_2.bias.copy_(proj["base_model.model.model.mm_projector.2.bias"])
    ref_sd, conv_sd = reference.state_dict(), converted.state_dict()
    assert ref_sd.keys() == conv_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(conv_sd[k], ref_sd[k], msg=k)
    base_sd = tiny["model"].state_dict()
    vision = [k for k in conv_sd if "vision_tower" in k]
    assert vision and all(torch.equal(conv_sd[k], base_sd[k]) for k in vision)  # vision tower untouched


def test_batched_greedy_matches_one_by_one(tiny, tmp_path):
    """Left-padded batches give the answers the unbatched run gives."""
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["iconqa"], n=4)
    texts = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        runner.evaluate(tiny["base"], tiny["merged"], ["iconqa"], str(data), str(out), batch_size=bs,
                        max_new_tokens=5, quiet=True, device="cpu")  # fmt: skip
        texts[bs] = [json.loads(x)["text"] for x in open(out / "iconqa" / "answers.jsonl")]
    assert texts[1] == texts[4] and any(texts[1])
