"""The official protocol, task by task, on a tiny LLaVA and hand-made data (offline):
preprocessing per task, ScienceQA's gold and denominator, records the official scripts
accept, a resume that never mixes settings, caption references, REC's IoU arithmetic,
--log-samples and the run's results.json."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("PIL")

from test_eval_e2e import build_processor, make_bench, tiny_llava  # noqa: E402

from robustmerge_kernels.eval import runner, scorers  # noqa: E402
from robustmerge_kernels.eval.tasks import load_registry  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny LLaVA base and one HF-layout LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("protocol")
    processor = build_processor()
    model = tiny_llava(processor)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=r".*language_model.*\.(q_proj|v_proj)"))  # fmt: skip
    peft.save_pretrained(root / "adapter")
    return {"base": str(root / "base"), "adapter": str(root / "adapter"), "processor": processor}


KW = dict(batch_size=2, max_new_tokens=3, quiet=True, device="cpu")


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _image(path, w, h, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)


def _capture(monkeypatch, answer=lambda prompt: "A"):
    """generate_batch replaced by a recorder returning canned answers."""
    seen = []

    def fake(model, processor, prompts, images, n):
        seen.extend(zip(prompts, images))
        return [answer(p) for p in prompts]

    monkeypatch.setattr(runner, "generate_batch", fake)
    return seen


# 1. Image preprocessing follows each task's official script ----------------------------

CROP = {"scienceqa", "aokvqa", "imagenet", "vqav2", "grounding"}  # image_processor.preprocess directly


def test_registry_preprocessing_is_the_official_scripts():
    reg = load_registry()
    assert {n for n, t in reg.tasks.items() if t.preprocess == "crop"} == CROP
    assert all(t.preprocess == "pad" for n, t in reg.tasks.items() if n not in CROP)


def test_rec_image_is_center_cropped_not_padded(base, tmp_path, monkeypatch):
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["grounding", "ocrvqa"], n=2)  # images 8x8 and 12x10: one is not square
    seen = _capture(monkeypatch, lambda p: "[ 0.1, 0.2, 0.5, 0.6 ]")
    runner.evaluate(base["base"], None, ["grounding", "ocrvqa"], str(data), str(tmp_path / "out"), **KW)
    from PIL import Image

    proc = base["processor"].image_processor
    assert len(seen) == 4  # grounding 0, 1 then ocrvqa 0, 1
    for i, ((_, image), task) in enumerate(zip(seen, ["grounding"] * 2 + ["ocrvqa"] * 2)):
        raw = Image.open(data / "datasets" / task / f"{i % 2}.png").convert("RGB")
        if task == "grounding":  # the CLIP processor alone: the image as it is
            assert image.size == raw.size
            got = proc(images=[image], return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(got, proc(images=[raw], return_tensors="pt")["pixel_values"])
        else:  # process_images with pad: a square
            assert image.size == (max(raw.size),) * 2
    assert seen[1][1].size == (12, 10)


# 2. ScienceQA: official gold and denominator -------------------------------------------


def _scienceqa_bench(root, with_official=True):
    qs = [
        {"question_id": "1", "image": "sqa/1.png", "text": "<image>\nWhat ?\nA. dog\nB. cat", "answer": "A"},
        {"question_id": "2", "text": "Which ?\nA. x\nB. y\nC. z", "answer": "B"},  # text only
        {"question_id": "3", "image": "sqa/3.png", "text": "What ?\nA. dog\nB. cat", "answer": "B"},
    ]
    _write(os.path.join(root, "instructions/ScienceQA/test.json"), qs)
    _image(os.path.join(root, "datasets/sqa/1.png"), 10, 8)
    _image(os.path.join(root, "datasets/sqa/3.png"), 8, 12)
    if with_official:
        problems = {
            "1": {"choices": ["dog", "cat"], "answer": 0, "image": "image.png"},
            "2": {"choices": ["x", "y", "z"], "answer": 2},  # gold C, where the question file says B
            "3": {"choices": ["dog", "cat"], "answer": 1, "image": "image.png"},
            "4": {"choices": ["p", "q"], "answer": 0},  # in the test split, never asked
            "9": {"choices": ["p", "q"], "answer": 0},  # not in the test split
        }
        _write(os.path.join(root, "datasets/ScienceQA/problems.json"), problems)
        _write(os.path.join(root, "datasets/ScienceQA/pid_splits.json"), {"test": ["1", "2", "3", "4"], "val": ["9"]})
    return qs


def test_scienceqa_official_gold_denominator_and_img_accuracy(base, tmp_path, monkeypatch, capsys):
    data = tmp_path / "bench"
    _scienceqa_bench(str(data))
    answers = {"What ?\nA. dog\nB. cat": "A", "Which ?\nA. x\nB. y\nC. z": "C"}
    _capture(monkeypatch, lambda p: next(a for q, a in answers.items() if q in p))
    res = runner.evaluate(base["base"], None, ["scienceqa"], str(data), str(tmp_path / "out"), **KW)["scienceqa"]
    # gold from problems.json: pid 1 A right, pid 2 C right (question file says B), pid 3 A wrong,
    # pid 4 unanswered: failed. Denominator: the 4 pids of the test split.
    assert (res["correct"], res["n"]) == (2, 4) and res["score"] == res["Accuracy"] == 50.0
    assert res["IMG-Accuracy"] == 50.0 and res["n_img"] == 2  # pids 1 and 3 were asked with an image
    assert res["gold"].startswith("official")
    assert "official gold" in capsys.readouterr().err


def test_scienceqa_without_official_files_says_so(base, tmp_path, monkeypatch, capsys):
    data = tmp_path / "bench"
    _scienceqa_bench(str(data), with_official=False)
    _capture(monkeypatch, lambda p: "B")
    res = runner.evaluate(base["base"], None, ["scienceqa"], str(data), str(tmp_path / "out"), **KW)["scienceqa"]
    assert res["gold"] == "question file" and (res["correct"], res["n"]) == (2, 3)
    assert "NOT eval_science_qa.py's gold" in capsys.readouterr().err
    summary = json.load(open(tmp_path / "out" / "results.json"))
    assert summary["tasks"]["scienceqa"]["gold"] == "question file"


def test_scienceqa_letter_outside_choices_is_wrong_with_problems():
    problems = {"1": {"choices": ["a", "b"], "answer": 1}}
    assert scorers.scienceqa([], {"1": "C"}, problems=problems, split_pids=["1"])["correct"] == 0
    assert scorers.scienceqa([], {"1": "B"}, problems=problems, split_pids=["1"])["correct"] == 1


# 3. Records the official scripts handle ------------------------------------------------


def test_text_only_and_image_token_records_are_asked_as_officially(base, tmp_path):
    """A text-only record is asked without an image; "<image>\\n" in the text is removed
    (model_vqa_science.py); mixed batches give the answers one-by-one gives."""
    data = tmp_path / "bench"
    _scienceqa_bench(str(data), with_official=False)
    texts = {}
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        runner.evaluate(base["base"], None, ["scienceqa"], str(data), str(out), batch_size=bs, max_new_tokens=3,
                        quiet=True, device="cpu")  # fmt: skip
        recs = [json.loads(x) for x in open(out / "scienceqa" / "answers.jsonl")]
        texts[bs] = [r["text"] for r in recs]
    assert texts[1] == texts[3]
    assert recs[0]["prompt"] == "What ?\nA. dog\nB. cat" and recs[1]["image"] is None


def test_image_token_in_a_task_that_keeps_it_is_a_clear_error(base, tmp_path):
    data = tmp_path / "bench"
    _write(str(data / "instructions/VQAv2/val.json"), [{"question_id": 1, "image": "v/1.png", "text": "<image>\nq"}])
    _image(str(data / "datasets/v/1.png"), 8, 8)
    with pytest.raises(ValueError, match=r"vqav2: question 1 contains '<image>'"):
        runner.evaluate(base["base"], None, ["vqav2"], str(data), str(tmp_path / "out"), **KW)


# 4. Resuming never mixes settings ------------------------------------------------------


def test_resume_with_other_settings_is_refused_or_restarted(base, tmp_path):
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["iconqa"], n=3)
    out = str(tmp_path / "out")
    runner.evaluate(base["base"], None, ["iconqa"], str(data), out, limit=2, **{**KW, "max_new_tokens": 2})
    with pytest.raises(ValueError, match="max_new_tokens: 2 -> 4.*--restart|limit: 2 -> null"):
        runner.evaluate(base["base"], None, ["iconqa"], str(data), out, **{**KW, "max_new_tokens": 4})
    res = runner.evaluate(base["base"], None, ["iconqa"], str(data), out, restart=True,
                          **{**KW, "max_new_tokens": 4})["iconqa"]  # fmt: skip
    fresh = runner.evaluate(base["base"], None, ["iconqa"], str(data), str(tmp_path / "fresh"),
                            **{**KW, "max_new_tokens": 4})["iconqa"]  # fmt: skip
    assert res == fresh and res["complete"]
    assert (
        open(os.path.join(out, "iconqa", "answers.jsonl")).read()
        == open(tmp_path / "fresh" / "iconqa" / "answers.jsonl").read()
    )


def test_resume_refuses_a_changed_adapter_at_the_same_path(base, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["iconqa"], n=1)
    adapter = tmp_path / "adapter"
    shutil.copytree(base["adapter"], adapter)
    out = str(tmp_path / "out")
    runner.evaluate(base["base"], str(adapter), ["iconqa"], str(data), out, **KW)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in sd.items()}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter"):
        runner.evaluate(base["base"], str(adapter), ["iconqa"], str(data), out, **KW)


# 5. Caption references -----------------------------------------------------------------


def test_missing_caption_references_warn_and_are_recorded(base, tmp_path, monkeypatch, capsys):
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["vizwiz_caption"], n=2)
    got = []

    def fake_scores(refs, cands):  # no Java: what matters is which references arrive
        got.append(refs)
        return dict.fromkeys(scorers.CAPTION_METRICS, 0.5)

    monkeypatch.setattr(scorers, "caption_scores", fake_scores)
    _capture(monkeypatch, lambda p: "a red dog")
    res = runner.evaluate(base["base"], None, ["vizwiz_caption"], str(data), str(tmp_path / "a"), **KW)
    assert res["vizwiz_caption"]["references"] == reg.tasks["vizwiz_caption"].references
    assert got[-1]["vizwiz_caption-0"] == ["a red dog", "the dog is red"]
    os.remove(data / reg.tasks["vizwiz_caption"].references)
    capsys.readouterr()
    res = runner.evaluate(base["base"], None, ["vizwiz_caption"], str(data), str(tmp_path / "b"), **KW)
    assert res["vizwiz_caption"]["references"] == "question answer field"
    assert "not found" in capsys.readouterr().err


# 8. REC IoU: the official arithmetic ---------------------------------------------------


def test_rec_iou_scaled_by_image_size_as_officially():
    """IoU exactly 0.5 in eval_grounding.py's arithmetic (boxes times max(size)), a hair
    above 0.5 on normalised boxes: officially not a hit."""
    gold, pred = [0.76, 0.1, 0.84, 0.7], [0.76, 0.1, 0.8, 0.7]
    assert scorers.box_iou(pred, gold) > 0.5
    assert scorers.rec_iou(pred, gold, [500, 333]) == 0.5
    q = [{"question_id": 0, "text": "t", "answer_bbox": "[0.76, 0.1, 0.84, 0.7]", "size": [500, 333]}]
    assert scorers.rec(q, {0: "[ 0.76, 0.1, 0.8, 0.7 ]"})["correct"] == 0
    assert scorers.rec([{**q[0], "size": [640, 480]}], {0: "[ 0.76, 0.1, 0.8, 0.7 ]"})["correct"] == int(
        scorers.rec_iou(pred, gold, [640, 480]) > 0.5
    )


# --log-samples and the run's results.json ----------------------------------------------


def test_log_samples_and_run_results(base, tmp_path, monkeypatch):
    reg = load_registry()
    data = tmp_path / "bench"
    make_bench(str(data), reg, ["ocrvqa"], n=3)
    _capture(monkeypatch, lambda p: "1")
    out = tmp_path / "out"
    runner.evaluate(base["base"], None, ["ocrvqa"], str(data), str(out), log_samples=True, limit=2, **KW)
    samples = [json.loads(x) for x in open(out / "ocrvqa" / "samples.jsonl")]
    assert [s["question_id"] for s in samples] == ["ocrvqa-0", "ocrvqa-1"]
    assert samples[1] == {"question_id": "ocrvqa-1", "image": "ocrvqa/1.png", "prompt": samples[1]["prompt"],
                          "raw": "1", "parsed": "1", "target": "1", "score": 1.0}  # fmt: skip
    assert samples[1]["prompt"].endswith("USER: <image>\nwhat number is this ? ASSISTANT:")
    assert samples[0]["score"] == 0.0
    run = json.load(open(out / "results.json"))
    assert run["complete"] is False and run["tasks"]["ocrvqa"]["complete"] is False
    assert run["n"] == {"ocrvqa": 2} and run["tasks"]["ocrvqa"]["questions"] == 3
    assert run["settings"]["limit"] == 2 and run["versions"]["torch"] == torch.__version__
    assert {"started", "finished", "commit"} <= set(run) and run["run"]["kind"] == "zero-shot"


def test_missing_image_fails_up_front_naming_the_task(base, tmp_path, monkeypatch):
    """Checked before any generation, so every data-parallel rank fails alike."""
    seen = _capture(monkeypatch)
    data = tmp_path / "bench"
    records = [{"question_id": i, "image": f"v/{i}.png", "text": "q"} for i in (1, 2)]
    _write(str(data / "instructions/VQAv2/val.json"), records)
    _image(str(data / "datasets/v/1.png"), 8, 8)
    with pytest.raises(FileNotFoundError, match=r"vqav2: 1 image\(s\) not found, e.g. .*v/2.png"):
        runner.evaluate(base["base"], None, ["vqav2"], str(data), str(tmp_path / "out"), **KW)
    assert seen == []
