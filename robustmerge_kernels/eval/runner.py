"""Run a model on MM-MergeBench tasks: batched greedy generation, resumable answers.

Layout of ``out`` (one folder per evaluated model)::

    out/run.json                 what was evaluated: base, adapter, label, kind, adapter_task
    out/<task>/answers.jsonl     one line per answered question, appended and fsync'ed per batch
    out/<task>/results.json      the task's scores, written (atomically) once every question is answered

A run that is interrupted resumes where it stopped: the questions already in
``answers.jsonl`` are skipped, and a torn last line (a crash mid-write) is cut off and its
question generated again. Nothing answered is recomputed or lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from .prompts import build_prompt, build_question
from .scorers import SCORERS
from .tasks import Task, load_questions, load_references, load_registry

ANSWERS = "answers.jsonl"
RESULTS = "results.json"
RUN = "run.json"


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_answers(path: str) -> dict[Any, dict]:
    """Answers already written, by question_id. A last line without its newline (torn by
    an interruption) is dropped and the file truncated to the last complete line."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    answers = {}
    for line in data[:end].splitlines():
        if line.strip():
            rec = json.loads(line)
            answers[rec["question_id"]] = rec
    return answers


def expand2square(image, background):
    """LLaVA-v1.5's ``image_aspect_ratio='pad'``: pad to a square with the processor's
    mean colour, centred, before the CLIP processor resizes and crops."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - w) // 2, (side - h) // 2))
    return result


def _load_image(path: str, processor):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return expand2square(image, tuple(int(x * 255) for x in mean))


@torch.inference_mode()
def generate_batch(model, processor, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
    """Greedy decoding (temperature 0) of a left-padded batch; the decoded continuations,
    stripped as LLaVA's eval scripts strip them."""
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tok = processor.tokenizer
    out = model.generate(
        **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def score_task(task: Task, questions: list[dict], answers: dict[Any, dict], data_root: str) -> dict:
    preds = {qid: rec["text"] for qid, rec in answers.items()}
    options = dict(task.scorer_options)
    if task.scorer == "caption":
        options["references"] = load_references(task, data_root, questions)
    result = SCORERS[task.scorer](questions, preds, **options)
    return {"task": task.name, "display": task.display, "group": task.group, "scorer": task.scorer, **result}


def run_task(get_model, task: Task, data_root: str, image_root: str, out_dir: str, *,
             conv_mode: str = "vicuna_v1", batch_size: int = 8, max_new_tokens: int | None = None,
             limit: int | None = None, log=None) -> dict:  # fmt: skip
    """Answer every question of one task (resuming), then score it. ``get_model()``
    returns (model, processor); it is called only when something is left to generate."""
    questions = load_questions(task, data_root)
    if limit is not None:
        questions = questions[:limit]
    task_dir = os.path.join(out_dir, task.name)
    os.makedirs(task_dir, exist_ok=True)
    path = os.path.join(task_dir, ANSWERS)
    answers = read_answers(path)
    todo = [q for q in questions if q["question_id"] not in answers]
    budget = max_new_tokens or task.max_new_tokens
    if log and answers:
        log(f"{task.name}: resuming, {len(answers)} answered, {len(todo)} to go")
    model, processor = get_model() if todo else (None, None)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts, images = [], []
            for q in batch:
                question = build_question(q["text"], task.text, task.prompt_suffix)
                prompts.append(build_prompt(question, conv_mode, with_image=True))
                images.append(_load_image(os.path.join(data_root, image_root, q["image"]), processor))
            texts = generate_batch(model, processor, prompts, images, budget)
            lines = []
            for q, text in zip(batch, texts):
                rec = {"question_id": q["question_id"], "prompt": build_question(q["text"], task.text, task.prompt_suffix),
                       "text": text, "answer": q.get("answer")}  # fmt: skip
                answers[q["question_id"]] = rec
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            if log:
                log(f"{task.name}: {min(start + batch_size, len(todo))}/{len(todo)}")
    result = score_task(task, questions, answers, data_root)
    _atomic_json(os.path.join(task_dir, RESULTS), result)
    return result


def describe_run(base: str, adapter: str | None, label: str | None, adapter_task: str | None) -> dict:
    """run.json: kind is zero-shot (no adapter), individual (``adapter_task`` given) or
    merged; a merged adapter written by this library names its method in robustmerge.json."""
    kind, method = "zero-shot", None
    if adapter:
        kind = "individual" if adapter_task else "merged"
        record = os.path.join(adapter, "robustmerge.json")
        if os.path.isfile(record):
            try:
                with open(record, encoding="utf-8") as f:
                    method = json.load(f).get("method")
            except (OSError, ValueError):
                method = None
    if label is None:
        label = {"zero-shot": "zero-shot", "individual": f"individual ({adapter_task})"}.get(kind)
        label = label or method or os.path.basename(os.path.normpath(adapter))
    return {"base": base, "adapter": adapter, "label": label, "kind": kind, "method": method,
            "adapter_task": adapter_task}  # fmt: skip


def evaluate(base: str, adapter: str | None, tasks: list[str], data_root: str, out: str, *,
             batch_size: int = 8, max_new_tokens: int | None = None, limit: int | None = None,
             label: str | None = None, adapter_task: str | None = None, registry: str | None = None,
             dtype: str = "auto", device: str = "cpu", quiet: bool = False) -> dict[str, dict]:  # fmt: skip
    """Evaluate one model (base, or base + adapter) on ``tasks``; returns task -> results."""
    reg = load_registry(registry)
    selected = reg.select(tasks)
    if adapter_task is not None and adapter_task not in reg.tasks:
        raise KeyError(f"unknown --adapter-task {adapter_task!r}")
    os.makedirs(out, exist_ok=True)
    run = describe_run(base, adapter, label, adapter_task)
    run_path = os.path.join(out, RUN)
    if os.path.isfile(run_path):
        with open(run_path, encoding="utf-8") as f:
            old = json.load(f)
        if (old.get("base"), old.get("adapter")) != (base, adapter):
            raise ValueError(f"{out} holds answers of another model ({old.get('base')}, {old.get('adapter')}); "
                             "use another --out")  # fmt: skip
    _atomic_json(run_path, run)

    def log(msg):
        if not quiet:
            print(f"[eval {run['label']}] {msg}", file=sys.stderr, flush=True)

    from .model import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    loaded: list = []

    def get_model():
        if not loaded:
            t0 = time.time()
            loaded.extend(load_model(base, adapter, dtype=dtype, device=device))
            log(f"model loaded in {time.time() - t0:.1f}s")
        return loaded[0], loaded[1]

    results = {}
    for task in selected:
        results[task.name] = run_task(get_model, task, data_root, reg.image_root, out, conv_mode=reg.conv_mode,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, log=log)  # fmt: skip
        log(f"{task.name}: {results[task.name]['score']:.2f}")
    return results
