"""Scorers for MM-MergeBench, one function per metric family.

Every scorer takes ``preds`` (question_id -> generated text, already ``.strip()``-ed as
LLaVA's eval scripts do) and ``questions`` (the task's question records, in file order),
and returns a dict with ``score`` (the number the paper's table reports, in percent),
``n`` and any sub-metrics. The semantics are those of RobustMerge's official scripts
(``llava/eval/eval_*.py``); where those scripts have quirks, the choice made here is
stated next to the code and pinned by ``tests/test_eval_scorers.py``.
"""

from __future__ import annotations

import atexit
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def _answer(q: Mapping[str, Any]) -> str:
    return str(q["answer"])


def _accuracy(questions: Sequence[Mapping[str, Any]], preds: Mapping[Any, str], correct: Callable,
              parse: Callable | None = None, details: list | None = None) -> dict:  # fmt: skip
    """Accuracy over every question; a question without a prediction counts as wrong
    (the official scripts' denominator is the number of results, which is the number of
    questions once a run is complete). ``details``, when a list, receives one
    ``{question_id, parsed, target, correct}`` per question (``--log-samples``);
    ``parse`` gives the parsed form of a prediction for it."""
    right = 0
    for q in questions:
        qid = q["question_id"]
        ok = qid in preds and bool(correct(preds[qid], q))
        right += ok
        if details is not None:
            parsed = None if qid not in preds else (parse(preds[qid]) if parse else preds[qid])
            details.append({"question_id": qid, "parsed": parsed, "target": q.get("answer"), "correct": ok})
    n = len(questions)
    return {"score": 100.0 * right / n if n else 0.0, "correct": right, "n": n}


# ScienceQA: llava/eval/eval_science_qa.py --------------------------------------------


def scienceqa_letter(pred: str, options: Sequence[str] = SCIENCEQA_OPTIONS) -> str:
    """The option letter in a prediction, parsed exactly as LLaVA's eval_science_qa.py:
    the whole text is a letter; or it starts "X. "; or exactly one "The answer is X."
    (regex ``The answer is ([A-Z]).``, where the final ``.`` matches any character);
    otherwise "FAILED"."""
    if pred in options:
        return pred
    if len(pred) >= 3 and pred[0] in options and pred[1:3] == ". ":
        return pred[0]
    found = re.findall(r"The answer is ([A-Z]).", pred)
    return found[0] if len(found) == 1 else "FAILED"


def _scienceqa_gold(q: Mapping[str, Any]) -> str:
    """The gold letter: MM-MergeBench stores it as the answer ("A"); an integer index (the
    raw ScienceQA problems.json form) is accepted too."""
    ans = q["answer"]
    if isinstance(ans, int):
        return SCIENCEQA_OPTIONS[ans]
    ans = str(ans).strip()
    return scienceqa_letter(ans)


def scienceqa(questions, preds, problems=None, split_pids=None, has_image=None, details=None, **_):
    """Option-letter accuracy (``score``, also ``Accuracy``) and ``IMG-Accuracy`` (over the
    questions asked with an image; ``has_image``: question_id -> bool).

    With ``problems`` (ScienceQA's problems.json) and ``split_pids`` (pid_splits.json's
    test list), eval_science_qa.py exactly: the gold is ``problems[pid]["answer"]`` (an
    index), the denominator every pid of the split (an unanswered pid counts as FAILED), a
    letter is valid only among the problem's choices (``options[:len(choices)]``), and a
    pid counts towards IMG-Accuracy when its answer's prompt had an image (so, quirk kept,
    an unanswered pid never does). Without them, the gold is each question's ``answer``
    and a letter outside the choices counts as wrong like any unparsable answer."""
    has_image = has_image or {}
    if problems is None:
        res = _accuracy(questions, preds, lambda p, q: scienceqa_letter(p) == _scienceqa_gold(q) != "FAILED",
                        parse=scienceqa_letter, details=details)  # fmt: skip
        flags = [(q["question_id"] in preds and scienceqa_letter(preds[q["question_id"]]) == _scienceqa_gold(q)
                  != "FAILED") for q in questions if has_image.get(q["question_id"])]  # fmt: skip
        res["gold"] = "question file"
    else:
        by_pid = {str(k): v for k, v in preds.items()}
        img = {str(k): v for k, v in has_image.items()}
        right, flags = 0, []
        for pid in split_pids:
            prob = problems[pid]
            letter = scienceqa_letter(by_pid[pid]) if pid in by_pid else "FAILED"
            valid = SCIENCEQA_OPTIONS[: len(prob["choices"])]
            ok = (valid.index(letter) if letter in valid else -1) == prob["answer"]
            right += ok
            if pid in by_pid and img.get(pid):
                flags.append(ok)
            if details is not None:
                details.append({"question_id": pid, "parsed": letter, "target": SCIENCEQA_OPTIONS[prob["answer"]],
                                "correct": ok})  # fmt: skip
        n = len(split_pids)
        res = {"score": 100.0 * right / n if n else 0.0, "correct": right, "n": n, "gold": "problems.json"}
    res["Accuracy"] = res["score"]
    res["IMG-Accuracy"] = 100.0 * sum(flags) / len(flags) if flags else None
    res["n_img"] = len(flags)
    return res


# Exact and substring matches ---------------------------------------------------------


def substring(questions, preds, details=None, **_):
    """ImageNet / ImageNet-R (eval_ImagetNet.py): correct when the upper-cased answer is in
    the upper-cased prediction or the other way round. Quirk kept: an empty prediction is
    a substring of every answer and so counts as correct, as in the official script.
    Difference: the official script pairs results with questions by position; this pairs
    them by question_id (identical for a complete, in-order run)."""

    def ok(p, q):
        a, p = _answer(q).upper(), p.upper()
        return a in p or p in a

    return _accuracy(questions, preds, ok, details=details)


def exact_upper(questions, preds, details=None, **_):
    """VQAv2, IconQA, TabMWP, AOKVQA (eval_vqav2.py, eval_iconqa.py, eval_aokvqa.py):
    ``pred.upper() == answer.upper()``, i.e. case-insensitive exact match, no other
    normalisation (no punctuation or article stripping, unlike the official VQAv2 server)."""
    return _accuracy(questions, preds, lambda p, q: p.upper() == _answer(q).upper(), details=details)


def ocrvqa(questions, preds, details=None, **_):
    """OCRVQA (eval_ocrvqa.py): ``pred.lower() == answer.lower()``. Quirk kept: a
    prediction containing "Unanswerable" (case-sensitive substring) is counted wrong even
    if the answer were "Unanswerable", and it stays in the denominator (the official
    script ``continue``s before comparing but divides by all results)."""
    return _accuracy(questions, preds, lambda p, q: "Unanswerable" not in p and p.lower() == _answer(q).lower(),
                     details=details)  # fmt: skip


# REC grounding: eval_grounding.py ------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_box(text: str, official: bool = True) -> list[float] | None:
    """Four normalised coordinates [x1, y1, x2, y2] from a box string, or None.

    ``official=True`` reproduces eval_grounding.py: remove every "[" and "]", then drop the
    first and the last character (``pred_bbox[1:-1]``), split on "," and ``float`` each
    part; anything but 4 parts, or a part ``float`` rejects, is unparsable (counted wrong).
    So "[0.12, 0.34, 0.56, 0.78]" is read as [0.12, 0.34, 0.56, 0.7]: the leading "0" of
    x1 and the last digit of y2 are lost. ``official=False`` reads the first four numbers
    anywhere in the text instead.
    """
    if official:
        s = text.replace("[", "").replace("]", "")[1:-1]
        try:
            box = [float(x) for x in s.split(",")]
        except ValueError:
            return None
        return box if len(box) == 4 else None
    nums = _NUMBER.findall(text)
    return [float(x) for x in nums[:4]] if len(nums) >= 4 else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes, as eval_grounding.calculate_iou (no +1 pixel
    terms; a non-positive union gives 0)."""
    x1, y1, x2, y2 = a
    u1, v1, u2, v2 = b
    inter = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
    return inter / union if union > 0 else 0.0


def rec_iou(pred: Sequence[float], gold: Sequence[float], size: Sequence[float] | None = None) -> float:
    """The IoU eval_grounding.eval_single computes: both normalised boxes multiplied by
    ``max(size)`` (the question's image size) first. In exact arithmetic that changes
    nothing, in floating point it decides boxes whose IoU is 0.5 to the last bit, so the
    official order of operations is kept. Without ``size`` the normalised boxes are used."""
    if size:
        m = max(size)
        pred, gold = [x * m for x in pred], [x * m for x in gold]
    return box_iou(pred, gold)


def _gold_box(q: Mapping[str, Any]) -> list[float]:
    raw = q.get("answer_bbox", q.get("answer"))
    if isinstance(raw, (list, tuple)):
        return [float(x) for x in raw]
    return [float(x) for x in str(raw).replace("[", "").replace("]", "").split(",")]


def rec(questions, preds, official_parse: bool = True, details=None, **_):
    """REC-COCO accuracy: IoU > 0.5 between the predicted and the gold normalised box
    (gold from ``answer_bbox`` when present, as the official test file has it, else
    ``answer``), computed as :func:`rec_iou` with the question's ``size``. An unparsable
    prediction counts as wrong and stays in the denominator."""

    def ok(p, q):
        box = parse_box(p, official=official_parse)
        return box is not None and rec_iou(box, _gold_box(q), q.get("size")) > 0.5

    return _accuracy(questions, preds, ok, parse=lambda p: parse_box(p, official=official_parse), details=details)


# Captions: eval_caption.py / eval_flickr30k.py / eval_vizwiz_caption.py ---------------


def caption_scores(references: Mapping[Any, list[str]], candidates: Mapping[Any, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap, after its PTB tokenizer,
    exactly the metrics COCOEvalCap computes (SPICE, which the official scripts do not
    report, is not run). METEOR and the tokenizer run Java. Values in [0, 1] (CIDEr can
    exceed 1)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(candidates)
    # One tokenizer JVM for references and candidates together (it tokenizes line by
    # line, so this is what two separate calls give): the JVM start costs ~1 s.
    both = {("ref", i): [{"caption": c} for c in references[i]] for i in ids}
    both.update({("cand", i): [{"caption": candidates[i]}] for i in ids})
    tokens = PTBTokenizer().tokenize(both)
    gts = {i: tokens[("ref", i)] for i in ids if ("ref", i) in tokens}  # as tokenizing references alone
    res = {i: tokens[("cand", i)] for i in ids}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        out[f"Bleu_{k + 1}"] = float(bleu[k])
    out["METEOR"] = _meteor_score(gts, res)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


# One METEOR JVM per process, started on first use: loading its paraphrase tables takes
# seconds, more than scoring a task, and an eval run (or a test session) scores several
# caption tasks. Stopped at interpreter exit, or by close_meteor().
_METEOR = None
_METEOR_LOCK = threading.Lock()


def _meteor_score(gts, res) -> float:
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:  # first use, or the JVM died
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
        meteor = _METEOR
        try:
            return float(meteor.compute_score(gts, res)[0])
        except BaseException:
            # compute_score does not release its lock when it fails, and the JVM's stdout
            # may be out of step: drop this process (a later call starts a fresh one).
            _METEOR = None
            if meteor.lock.locked():
                meteor.lock.release()
            _close_meteor(meteor)
            raise


def close_meteor() -> None:
    """Stop the shared METEOR process now (it is started again when next needed)."""
    global _METEOR
    with _METEOR_LOCK:
        meteor, _METEOR = _METEOR, None
    if meteor is not None:
        _close_meteor(meteor)


atexit.register(close_meteor)


def _close_meteor(meteor) -> None:
    """Stop METEOR's Java process now rather than at garbage collection (its ``__del__``
    repeats this harmlessly later)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None:
        try:
            proc.stdin.close()
            proc.kill()
            proc.wait(timeout=10)
        except Exception:
            pass


def caption(questions, preds, references: Mapping[Any, list[str]] | None = None, **_):
    """Caption score = mean of the seven metrics x 100, the "Average" the official
    scripts print and the paper reports. References come from the COCO-format annotation
    file when the task has one (``references`` keyed by question_id, built by the runner
    from image_id 1..N in question order, the official scripts' positional matching), else
    from each question's ``answer`` (a string or a list of strings)."""
    refs: dict[Any, list[str]] = {}
    for q in questions:
        qid = q["question_id"]
        if references is not None:
            refs[qid] = list(references.get(qid, []))
        else:
            ans = q["answer"]
            refs[qid] = [ans] if isinstance(ans, str) else [str(a) for a in ans]
    # a missing prediction scores as an empty caption (it still counts)
    cands = {q["question_id"]: preds.get(q["question_id"], "") for q in questions}
    metrics = caption_scores(refs, cands)
    pct = {k: 100.0 * v for k, v in metrics.items()}
    return {"score": sum(pct.values()) / len(pct), "n": len(questions), **pct}


SCORERS: dict[str, Callable[..., dict]] = {
    "scienceqa": scienceqa,
    "substring": substring,
    "exact_upper": exact_upper,
    "ocrvqa": ocrvqa,
    "rec": rec,
    "caption": caption,
}
