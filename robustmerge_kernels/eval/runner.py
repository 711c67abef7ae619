"""Run a model on MM-MergeBench tasks: batched greedy generation, resumable answers.

Layout of ``out`` (one folder per evaluated model)::

    out/run.json                 what was evaluated: base, adapter, label, kind, adapter_task
    out/results.json             the run: settings, versions, commit, dates, n and score per task, complete?
    out/<task>/settings.json     what the task's answers depend on (see settings.py)
    out/<task>/answers.jsonl     one line per answered question, appended and fsync'ed per batch
    out/<task>/results.json      the task's scores, written (atomically) once every question is answered
    out/<task>/samples.jsonl     with --log-samples: prompt, image, raw and parsed answer, target, score

A run that is interrupted resumes where it stopped: the questions already in
``answers.jsonl`` are skipped, and a torn last line (a crash mid-write) is cut off and its
question generated again. Nothing answered is recomputed or lost. A run with settings
other than those the answers were made with is refused (``--restart`` discards them).
Data-parallel runs (torchrun, ``--num-chunks``) are described in shards.py.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch

from ..jsonfile import write_json
from . import settings as S
from .inputs import has_image, prepare, question_text
from .scoring import score_task
from .shards import Shard, detect, get_chunk
from .tasks import Task, load_questions, load_registry

ANSWERS = "answers.jsonl"
RESULTS = "results.json"
RUN = "run.json"
SETTINGS = "settings.json"
SAMPLES = "samples.jsonl"


def _atomic_json(path: str, obj: Any) -> None:
    write_json(path, obj)


def _atomic_lines(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_answers(path: str, truncate: bool = True) -> dict[Any, dict]:
    """Answers already written, by question_id. A last line without its newline (torn by
    an interruption) is dropped and, with ``truncate`` (the file is this process's), the
    file cut to the last complete line; another shard's file is only read."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if truncate and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    answers = {}
    for line in data[:end].splitlines():
        if line.strip():
            rec = json.loads(line)
            answers[rec["question_id"]] = rec
    return answers


def _answer_files(task_dir: str) -> list[str]:
    return [os.path.join(task_dir, ANSWERS), *sorted(glob.glob(os.path.join(task_dir, "answers.part-*-of-*.jsonl")))]


def read_all_answers(task_dir: str, own: str | None = None) -> dict[Any, dict]:
    answers: dict[Any, dict] = {}
    for path in _answer_files(task_dir):
        answers.update(read_answers(path, truncate=path == own))
    return answers


@torch.inference_mode()
def generate_batch(model, processor, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
    """Greedy decoding (temperature 0) of a left-padded batch; the decoded continuations,
    stripped as LLaVA's eval scripts strip them. ``images[i]`` is None for a text-only
    prompt (no image token); the others are matched to the image tokens in order."""
    pictures = [im for im in images if im is not None]  # text-only questions have None
    inputs = processor(text=prompts, images=pictures or None, padding=True, return_tensors="pt")
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


def _prepare_task_dir(task_dir: str, key: dict, shard: Shard, restart: bool, log) -> None:
    """Check (every shard) that the answers on disk were made with ``key``; refuse, or with
    ``restart`` (done by the main shard) discard them; record ``key``."""
    settings_path = os.path.join(task_dir, SETTINGS)
    old = _read_json(settings_path)
    has_answers = any(os.path.isfile(p) and os.path.getsize(p) > 0 for p in _answer_files(task_dir))
    stale = (has_answers or os.path.isfile(os.path.join(task_dir, RESULTS))) and old != key
    if not shard.agree(not stale or restart) or (stale and not restart):
        why = "; ".join(S.differences(old, key)) if old else f"no {SETTINGS} (made by an older version)"
        raise ValueError(f"{task_dir}: its answers were generated with other settings ({why}); "
                         "use --restart to discard them, or another --out")  # fmt: skip
    shard.barrier()
    if shard.is_main:
        if stale:
            log(f"{os.path.basename(task_dir)}: settings changed, discarding the old answers (--restart)")
            for path in [*_answer_files(task_dir), os.path.join(task_dir, RESULTS), os.path.join(task_dir, SAMPLES)]:
                if os.path.isfile(path):
                    os.remove(path)
        if old != key or stale:
            _atomic_json(settings_path, key)
        read_answers(os.path.join(task_dir, ANSWERS))  # cut a torn last line before anyone reads
    elif not shard.distributed and old != key:
        _atomic_json(settings_path, key)  # an independent chunk, first of its task
    shard.barrier()


def _check_records(questions: list[dict], task: Task, image_dir: str) -> None:
    """Every record askable (text, image) before any generation: a bad record fails every
    shard the same way, up front, not one rank in the middle of a run."""
    missing = []
    for q in questions:
        question_text(q, task)
        if has_image(q, task) and not os.path.isfile(os.path.join(image_dir, q["image"])):
            missing.append(os.path.join(image_dir, q["image"]))
    if missing:
        raise FileNotFoundError(f"task {task.name}: {len(missing)} image(s) not found, e.g. {missing[0]}")


def run_task(get_model, task: Task, data_root: str, image_root: str, out_dir: str, *,
             conv_mode: str = "vicuna_v1", batch_size: int = 8, max_new_tokens: int | None = None,
             limit: int | None = None, log=None, key: dict | None = None, shard: Shard | None = None,
             restart: bool = False, log_samples: bool = False,
             scienceqa_dir: str | None = None) -> dict | None:  # fmt: skip
    """Answer this shard's questions of one task (resuming), then, where every shard is
    done, gather and score. ``get_model()`` returns (model, processor); it is called only
    when something is left to generate. Returns the task's results, or None for an
    independent chunk whose task still lacks other chunks' answers."""
    shard = shard or Shard()
    log = log or (lambda msg: None)
    all_questions = load_questions(task, data_root)
    questions = all_questions if limit is None else all_questions[:limit]
    _check_records(questions, task, os.path.join(data_root, image_root))
    task_dir = os.path.join(out_dir, task.name)
    os.makedirs(task_dir, exist_ok=True)
    _prepare_task_dir(task_dir, key or {}, shard, restart, log)
    own = os.path.join(task_dir, shard.part_name())
    answers = read_all_answers(task_dir, own=own)
    mine = get_chunk(questions, shard.count, shard.index)
    todo = [q for q in mine if q["question_id"] not in answers]
    budget = max_new_tokens or task.max_new_tokens
    if answers:
        log(f"{task.name}: resuming, {len(answers)} answered, {len(todo)} to go in this shard")
    model, processor = get_model() if todo else (None, None)
    image_dir = os.path.join(data_root, image_root)
    with open(own, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prepared = [prepare(q, task, image_dir, processor, conv_mode) for q in batch]
            texts = generate_batch(model, processor, [p[1] for p in prepared], [p[2] for p in prepared], budget)
            lines = []
            for q, (question, _, image), text in zip(batch, prepared, texts):
                rec = {"question_id": q["question_id"], "prompt": question, "text": text, "answer": q.get("answer"),
                       "image": q.get("image") if image is not None else None}  # fmt: skip
                answers[q["question_id"]] = rec
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            log(f"{task.name}: {min(start + batch_size, len(todo))}/{len(todo)}")
    shard.barrier()
    result = None
    if shard.is_main or not shard.distributed:
        answers = read_all_answers(task_dir, own=own)
        missing = sum(q["question_id"] not in answers for q in questions)
        if missing and not shard.distributed and shard.count > 1:
            log(f"{task.name}: chunk {shard.index}/{shard.count} done; {missing} questions of other chunks to go, "
                "the last chunk to finish scores")  # fmt: skip
        else:
            result = _gather_and_score(task, questions, answers, task_dir, data_root, limit=limit,
                                       n_file=len(all_questions), log_samples=log_samples,
                                       scienceqa_dir=scienceqa_dir, conv_mode=conv_mode)  # fmt: skip
    shard.barrier()
    if result is None and shard.distributed:
        result = _read_json(os.path.join(task_dir, RESULTS))
    return result


def _gather_and_score(task, questions, answers, task_dir, data_root, *, limit, n_file, log_samples,
                      scienceqa_dir, conv_mode) -> dict:  # fmt: skip
    """answers.jsonl rewritten in question order (shard files folded in and removed),
    then results.json (and samples.jsonl)."""
    order = {q["question_id"]: i for i, q in enumerate(questions)}
    records = sorted(answers.values(), key=lambda r: order.get(r["question_id"], len(order)))
    _atomic_lines(os.path.join(task_dir, ANSWERS), records)
    for path in _answer_files(task_dir)[1:]:
        os.remove(path)
    samples: list | None = [] if log_samples else None
    result = score_task(task, questions, answers, data_root, limit=limit, n_file=n_file,
                        scienceqa_dir=scienceqa_dir, samples=samples, conv_mode=conv_mode)  # fmt: skip
    _atomic_json(os.path.join(task_dir, RESULTS), result)
    if samples is not None:
        _atomic_lines(os.path.join(task_dir, SAMPLES), samples)
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def evaluate(base: str, adapter: str | None, tasks: list[str], data_root: str, out: str, *,
             batch_size: int = 8, max_new_tokens: int | None = None, limit: int | None = None,
             label: str | None = None, adapter_task: str | None = None, registry: str | None = None,
             dtype: str = "auto", device: str = "cpu", quiet: bool = False, num_chunks: int | None = None,
             chunk_idx: int | None = None, log_samples: bool = False, restart: bool = False,
             scienceqa_dir: str | None = None) -> dict[str, dict]:  # fmt: skip
    """Evaluate one model (base, or base + adapter) on ``tasks``; returns task -> results
    (of the tasks scored by this process: an independent chunk may leave some to others)."""
    started = _now()
    reg = load_registry(registry)
    selected = reg.select(tasks)
    if adapter_task is not None and adapter_task not in reg.tasks:
        raise KeyError(f"unknown --adapter-task {adapter_task!r}")
    shard = detect(num_chunks, chunk_idx)
    if restart and shard.count > 1 and not shard.distributed:
        raise ValueError("--restart with --num-chunks would let one chunk delete another's answers; "
                         "restart once without chunks, or use another --out")  # fmt: skip
    os.makedirs(out, exist_ok=True)
    run = describe_run(base, adapter, label, adapter_task)
    run_path = os.path.join(out, RUN)
    old = _read_json(run_path)
    if old is not None and (old.get("base"), old.get("adapter")) != (base, adapter):
        raise ValueError(f"{out} holds answers of another model ({old.get('base')}, {old.get('adapter')}); "
                         "use another --out")  # fmt: skip
    if shard.is_main or not shard.distributed:
        _atomic_json(run_path, run)

    def log(msg):
        if not quiet:
            where = f" {shard.index}/{shard.count}" if shard.count > 1 else ""
            print(f"[eval {run['label']}{where}] {msg}", file=sys.stderr, flush=True)

    from .model import load_model

    if device == "auto":
        # one GPU per local rank (several ranks share the GPUs when there are fewer)
        device = f"cuda:{shard.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"

    # Content hashes: the main shard hashes first, the others then find them in the cache.
    hashes: dict[str, str | None] = {}
    for turn in (True, False):
        if (shard.is_main or not shard.distributed) == turn:
            hashes = {"base": S.content_hash(base, out), "adapter": S.content_hash(adapter, out)}
        shard.barrier()

    loaded: list = []

    def get_model():
        if not loaded:
            t0 = time.time()
            loaded.extend(load_model(base, adapter, dtype=dtype, device=device))
            log(f"model loaded in {time.time() - t0:.1f}s")
        return loaded[0], loaded[1]

    results = {}
    for task in selected:
        budget = max_new_tokens or task.max_new_tokens
        key = S.task_key(base_hash=hashes["base"], adapter_hash=hashes["adapter"], task=task, conv_mode=reg.conv_mode,
                         image_root=reg.image_root, max_new_tokens=budget, dtype=dtype, limit=limit)  # fmt: skip
        key["questions"] = S.content_hash(os.path.join(data_root, task.question_file))
        res = run_task(get_model, task, data_root, reg.image_root, out, conv_mode=reg.conv_mode,
                       batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, log=log, key=key,
                       shard=shard, restart=restart, log_samples=log_samples, scienceqa_dir=scienceqa_dir)  # fmt: skip
        if res is not None:
            results[task.name] = res
            log(f"{task.name}: {res['score']:.2f}" + ("" if res["complete"] else
                f" (INCOMPLETE: {res['answered']} of {res['questions']} questions)"))  # fmt: skip
    if results and (shard.is_main or not shard.distributed):
        settings = {"tasks": [t.name for t in selected], "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                    "limit": limit, "dtype": dtype, "device": device, "shards": shard.count,
                    "conv_mode": reg.conv_mode, "registry": registry or "built-in", "data_root": data_root,
                    "base_sha256": hashes["base"], "adapter_sha256": hashes["adapter"]}  # fmt: skip
        write_run_results(out, run, settings, results, started)
    return results


def write_run_results(out: str, run: dict, settings: dict, results: dict[str, dict], started: str) -> dict:
    """``out/results.json``: one record of the run. Tasks scored by earlier invocations
    into the same folder are kept (each task keeps its own settings in its folder)."""
    path = os.path.join(out, RESULTS)
    old = _read_json(path) or {}
    tasks = dict(old.get("tasks", {}))
    for name, res in results.items():
        tasks[name] = {k: res.get(k) for k in ("display", "group", "score", "n", "answered", "questions", "limit",
                                               "complete", "gold", "references", "preprocess")}  # fmt: skip
        tasks[name]["settings"] = settings
    record = {
        "run": run, "settings": settings, "versions": S.versions(), "commit": S.commit(),
        "started": old.get("started", started), "finished": _now(), "tasks": tasks,
        "n": {k: v["n"] for k, v in tasks.items()},
        "complete": all(v["complete"] for v in tasks.values()),
    }  # fmt: skip
    _atomic_json(path, record)
    return record
