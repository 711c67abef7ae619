"""One question record -> (question text, full prompt, image), as the task's official
generation script builds them.

Two image paths exist in RobustMerge's scripts, and the registry's ``preprocess`` names
which one a task follows:

* ``pad``: ``process_images`` with LLaVA-v1.5's ``image_aspect_ratio='pad'``
  (model_flickr30k.py, model_ocr_vqa.py, model_tabmwp.py, model_vqa.py): the image is
  padded to a square with the processor's mean colour, then resized by the CLIP processor.
* ``crop``: ``image_processor.preprocess`` called directly (model_vqa_science.py,
  model_vqa_cc_imagenet.py, model_vqa_cc_instruction.py): the CLIP processor alone,
  shortest side resized and center-cropped, no padding.

model_vqa_science.py (ScienceQA, AOKVQA; ``strip_image_token`` and ``text_only``) also
removes "<image>" from the question text and asks a record without ``image`` as text only.
"""

from __future__ import annotations

import os
from typing import Any

from .prompts import IMAGE_TOKEN, build_prompt, build_question
from .tasks import Task


def expand2square(image, background):
    """LLaVA's ``expand2square``: pad to a square with ``background``, image centred."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - w) // 2, (side - h) // 2))
    return result


def load_image(path: str, processor, preprocess: str = "pad"):
    """The PIL image handed to the processor for a task with this ``preprocess``."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if preprocess == "crop":
        return image  # the CLIP processor resizes and center-crops it
    if preprocess != "pad":
        raise ValueError(f"unknown preprocess {preprocess!r} (pad or crop)")
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return expand2square(image, tuple(int(x * 255) for x in mean))


def question_text(q: dict[str, Any], task: Task) -> str:
    """The user's question (without the image token), or ValueError naming the record."""
    text = q["text"]
    if task.strip_image_token:
        text = text.replace(IMAGE_TOKEN, "").strip()  # model_vqa_science.py
    elif IMAGE_TOKEN in text:
        script = task.official_script or "its script"
        raise ValueError(f"task {task.name}: question {q['question_id']!r} contains {IMAGE_TOKEN!r} in its text; "
                         f"{script} does not remove it (set strip_image_token)")  # fmt: skip
    return build_question(text, task.text, task.prompt_suffix)


def has_image(q: dict[str, Any], task: Task) -> bool:
    if "image" in q and q["image"]:
        return True
    if task.text_only:
        return False
    raise ValueError(f"task {task.name}: question {q['question_id']!r} has no 'image' and "
                     f"{task.official_script or 'its script'} asks every question with one")  # fmt: skip


def prepare(q: dict[str, Any], task: Task, image_dir: str, processor, conv_mode: str):
    """(question text, full prompt, PIL image or None) for one record."""
    question = question_text(q, task)
    with_image = has_image(q, task)
    prompt = build_prompt(question, conv_mode, with_image=with_image)
    if not with_image:
        return question, prompt, None
    path = os.path.join(image_dir, q["image"])
    return question, prompt, load_image(path, processor, task.preprocess)
