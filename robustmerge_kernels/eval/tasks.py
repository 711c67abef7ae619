"""The MM-MergeBench task registry: data (``tasks.json``), not code branches.

A task is a question file (a JSON list of ``{question_id, image, text, answer}`` records,
as MM-MergeBench ships it), how its prompt is built (``text`` mode and ``prompt_suffix``),
``max_new_tokens``, the name of a scorer in :mod:`.scorers`, and for captions an optional
COCO-format reference file. ``group`` is ``seen`` or ``unseen``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

PREPROCESS = ("pad", "crop")


@dataclass(frozen=True)
class Task:
    name: str
    display: str
    group: str
    question_file: str
    scorer: str
    max_new_tokens: int
    text: str = "full"
    prompt_suffix: str = ""
    references: str | None = None
    scorer_options: dict[str, Any] = field(default_factory=dict)
    # How the image reaches the CLIP processor, as the task's official script does it:
    # "pad" (process_images with image_aspect_ratio=pad: expand2square first) or "crop"
    # (image_processor.preprocess alone: resize the short side, center crop).
    preprocess: str = "pad"
    official_script: str | None = None
    strip_image_token: bool = False  # model_vqa_science.py removes "<image>" from the text
    text_only: bool = False  # ... and asks a record without "image" with no image
    official_gold: dict[str, str] | None = None  # ScienceQA: problems.json / pid_splits.json

    def spec(self) -> dict[str, Any]:
        """Everything the registry says about this task (for the resume key)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Registry:
    tasks: dict[str, Task]
    image_root: str
    conv_mode: str

    def select(self, names: list[str]) -> list[Task]:
        """Tasks by name; ``all``, ``seen`` and ``unseen`` expand to their groups."""
        out: list[Task] = []
        for name in names:
            if name in ("all", "seen", "unseen"):
                picked = [t for t in self.tasks.values() if name == "all" or t.group == name]
            elif name in self.tasks:
                picked = [self.tasks[name]]
            else:
                raise KeyError(f"unknown task {name!r}; known: {', '.join(self.tasks)}, all, seen, unseen")
            out += [t for t in picked if t not in out]
        return out


def load_registry(path: str | None = None) -> Registry:
    """The registry in ``path``, or the built-in MM-MergeBench one."""
    if path is None:
        raw = json.loads(resources.files(__package__).joinpath("tasks.json").read_text(encoding="utf-8"))
    else:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    tasks = {}
    for name, spec in raw["tasks"].items():
        from .scorers import SCORERS

        if spec["scorer"] not in SCORERS:
            raise ValueError(f"task {name}: unknown scorer {spec['scorer']!r}")
        if spec.get("group") not in ("seen", "unseen"):
            raise ValueError(f"task {name}: group must be seen or unseen")
        if spec.get("preprocess", "pad") not in PREPROCESS:
            raise ValueError(f"task {name}: preprocess must be one of {', '.join(PREPROCESS)}")
        tasks[name] = Task(name=name, **spec)
    return Registry(tasks, raw.get("image_root", ""), raw.get("conv_mode", "vicuna_v1"))


def load_questions(task: Task, data_root: str) -> list[dict[str, Any]]:
    path = os.path.join(data_root, task.question_file)
    with open(path, encoding="utf-8") as f:
        questions = json.load(f)
    if not isinstance(questions, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    seen = set()
    for i, q in enumerate(questions):
        for key in ("question_id", "text"):
            if key not in q:
                raise ValueError(f"{path}: question #{i} has no {key!r}")
        if q["question_id"] in seen:
            raise ValueError(f"{path}: duplicate question_id {q['question_id']!r}")
        seen.add(q["question_id"])
    return questions


def load_references(task: Task, data_root: str, questions: list[dict[str, Any]]) -> dict[Any, list[str]] | None:
    """COCO-format caption references keyed by question_id. As in the official caption
    scripts, the i-th question (file order) is image_id i+1 of the annotation file."""
    if not task.references:
        return None
    path = os.path.join(data_root, task.references)
    if not os.path.isfile(path):
        return None  # fall back to each question's answer
    with open(path, encoding="utf-8") as f:
        anns = json.load(f)["annotations"]
    by_image: dict[int, list[str]] = {}
    for a in anns:
        by_image.setdefault(int(a["image_id"]), []).append(a["caption"])
    return {q["question_id"]: by_image.get(i + 1, []) for i, q in enumerate(questions)}
