"""Score one task's gathered answers: the scorer's inputs the official scripts use
(caption references, ScienceQA's problems.json), said loudly when they are missing, and
the per-sample log of ``--log-samples``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .prompts import build_prompt
from .scorers import SCORERS
from .tasks import Task, load_references


def warn(msg: str) -> None:
    print(f"robustmerge eval: WARNING: {msg}", file=sys.stderr, flush=True)


def scienceqa_gold(task: Task, data_root: str, override_dir: str | None = None):
    """(problems, split pids, where from) from ScienceQA's problems.json and
    pid_splits.json (eval_science_qa.py's ``--base-dir``), or None when absent."""
    gold = task.official_gold or {}
    if override_dir:
        paths = (os.path.join(override_dir, "problems.json"), os.path.join(override_dir, "pid_splits.json"))
    elif gold:
        paths = (os.path.join(data_root, gold["problems"]), os.path.join(data_root, gold["pid_splits"]))
    else:
        return None
    if not all(os.path.isfile(p) for p in paths):
        if override_dir:
            raise FileNotFoundError(f"--scienceqa-dir {override_dir}: needs problems.json and pid_splits.json")
        return None
    with open(paths[0], encoding="utf-8") as f:
        problems = json.load(f)
    with open(paths[1], encoding="utf-8") as f:
        split = json.load(f)[gold.get("split", "test")]
    return problems, [str(p) for p in split], paths


def scorer_options(task: Task, questions: list[dict], data_root: str, limit: int | None,
                   scienceqa_dir: str | None) -> tuple[dict, dict]:  # fmt: skip
    """(keyword arguments for the scorer, what they were made of, for results.json)."""
    options: dict[str, Any] = dict(task.scorer_options)
    used: dict[str, Any] = {}
    if task.scorer == "caption":
        refs = load_references(task, data_root, questions)
        if refs is None:
            path = os.path.join(data_root, task.references) if task.references else None
            warn(f"{task.name}: caption references {path or '(none in the registry)'} not found; scoring against "
                 "each question's 'answer' (1 reference per image where the official file has several: "
                 "scores are NOT comparable to the paper's)")  # fmt: skip
            used["references"] = "question answer field"
        else:
            used["references"] = task.references
            counts = [len(r) for r in refs.values()]
            used["references_per_image"] = [min(counts), max(counts)] if counts else None
        options["references"] = refs
    if task.scorer == "scienceqa":
        options["has_image"] = {q["question_id"]: bool(q.get("image")) for q in questions}
        gold = scienceqa_gold(task, data_root, scienceqa_dir)
        if gold is None:
            looked = [v for k, v in (task.official_gold or {}).items() if k in ("problems", "pid_splits")]
            warn(f"{task.name}: problems.json / pid_splits.json not found (looked for "
                 f"{', '.join(looked) or 'nothing'} under {data_root}); scoring against "
                 "the question file's 'answer' with the question file as denominator, NOT eval_science_qa.py's "
                 "gold and test split (pass --scienceqa-dir DIR)")  # fmt: skip
            used["gold"] = "question file"
        else:
            problems, pids, paths = gold
            if limit is not None:  # a quick check: the split's pids among the questions asked
                asked = {str(q["question_id"]) for q in questions}
                pids = [p for p in pids if p in asked]
            options["problems"], options["split_pids"] = problems, pids
            used["gold"] = f"official: {paths[0]} + {paths[1]}[{(task.official_gold or {}).get('split', 'test')}]"
            print(f"robustmerge eval: {task.name}: official gold {used['gold']}, {len(pids)} pids", file=sys.stderr)
    return options, used


def score_task(task: Task, questions: list[dict], answers: dict[Any, dict], data_root: str, *,
               limit: int | None = None, n_file: int | None = None, scienceqa_dir: str | None = None,
               samples: list | None = None, conv_mode: str = "vicuna_v1") -> dict:  # fmt: skip
    """The task's results: the scorer's, and n, completeness and the inputs used.
    ``samples``, when a list, receives the ``--log-samples`` records."""
    preds = {qid: rec["text"] for qid, rec in answers.items()}
    options, used = scorer_options(task, questions, data_root, limit, scienceqa_dir)
    details: list | None = [] if samples is not None else None
    result = SCORERS[task.scorer](questions, preds, details=details, **options)
    answered = sum(q["question_id"] in answers for q in questions)
    n_file = len(questions) if n_file is None else n_file
    complete = answered == len(questions) == n_file
    if samples is not None:
        by_id = {str(d["question_id"]): d for d in details or []}
        refs = options.get("references")
        for q in questions:
            rec = answers.get(q["question_id"], {})
            d = by_id.get(str(q["question_id"]), {})
            image = q.get("image") or None
            samples.append({
                "question_id": q["question_id"], "image": image,
                "prompt": build_prompt(rec["prompt"], conv_mode, with_image=bool(image)) if rec else None,
                "raw": rec.get("text"), "parsed": d.get("parsed", rec.get("text")),
                "target": d.get("target", refs.get(q["question_id"]) if refs else q.get("answer")),
                # caption metrics are corpus-level: no per-sample score
                "score": None if "correct" not in d else float(d["correct"]),
            })  # fmt: skip
    return {"task": task.name, "display": task.display, "group": task.group, "scorer": task.scorer,
            "preprocess": task.preprocess, **result, **used, "answered": answered, "questions": n_file,
            "limit": limit, "complete": complete}  # fmt: skip
