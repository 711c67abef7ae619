"""MM-MergeBench scorers on hand-made cases; expected values are worked out here, and every
official-script quirk kept (or not) is pinned with the choice made."""

from __future__ import annotations

import math
import shutil

import pytest

from robustmerge_kernels.eval import scorers as S
from robustmerge_kernels.eval.prompts import build_question
from robustmerge_kernels.eval.tasks import load_registry


def qs(*answers, **extra):
    return [{"question_id": i, "text": "q", "answer": a, **extra} for i, a in enumerate(answers)]


def preds(*texts):
    return dict(enumerate(texts))


# ScienceQA -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("B", "B"),  # the whole text is a letter
        ("C. the cat", "C"),  # "X. " prefix
        ("The answer is D.", "D"),  # one "The answer is X."
        ("The answer is A. The answer is B.", "FAILED"),  # two matches: unparsable
        ("b", "FAILED"),  # lower case is not a letter (official: exact "in options")
        ("B.", "FAILED"),  # "B." without the space after the dot is not "X. "
        ("F", "FAILED"),  # outside A-E
        ("The answer is B", "FAILED"),  # the regex needs a character after the letter
    ],
)
def test_scienceqa_letter_parsing_as_llava(pred, letter):
    assert S.scienceqa_letter(pred) == letter


def test_scienceqa_accuracy():
    # gold A, B, C, 1 (index form = B); preds right, right ("B. x"), wrong, right
    r = S.scienceqa(qs("A", "B", "C", 1), preds("A", "B. dog", "The answer is A.", "B"))
    assert (r["correct"], r["n"]) == (3, 4) and r["score"] == 75.0


# ImageNet / ImageNet-R ------------------------------------------------------------------


def test_substring_either_way_uppercased():
    gold = qs("Golden retriever", "Cat", "dog", "Tabby cat")
    r = S.substring(gold, preds("golden RETRIEVER", "a cat", "hotdog", "cat"))
    # "CAT" in "A CAT" (1); "DOG" in "HOTDOG" (quirk: substring, 1); "CAT" in "TABBY CAT" (other way, 1)
    assert r["correct"] == 4 and r["score"] == 100.0
    assert S.substring(qs("dog"), preds("cat"))["correct"] == 0


def test_substring_quirk_empty_prediction_counts_correct():
    """Kept from eval_ImagetNet.py: "" is a substring of every answer."""
    assert S.substring(qs("dog"), preds(""))["correct"] == 1


# VQAv2 / IconQA / TabMWP / AOKVQA -------------------------------------------------------


def test_exact_upper_case_insensitive_only():
    gold = qs("Yes", "2", "red", "a dog", "3")
    r = S.exact_upper(gold, preds("yes", "2", "Red.", "dog", "three"))
    # only case is normalised: "Red." (punctuation), "dog" (article), "three" (number word) are wrong
    assert r["correct"] == 2 and r["score"] == 40.0


def test_missing_prediction_counts_wrong():
    assert S.exact_upper(qs("a", "b"), {0: "a"})["score"] == 50.0


# OCRVQA ---------------------------------------------------------------------------------


def test_ocrvqa_lowercase_exact_and_unanswerable_quirk():
    gold = qs("Harry Potter", "Unanswerable", "no", "Yes")
    r = S.ocrvqa(gold, preds("harry potter", "Unanswerable", "unanswerable", "It is Unanswerable"))
    # 1 right; "Unanswerable" == gold still wrong (official `continue`s before comparing);
    # "unanswerable" lower case is not caught by the case-sensitive check but != "no";
    # all four stay in the denominator
    assert (r["correct"], r["n"], r["score"]) == (1, 4, 25.0)
    assert S.ocrvqa(qs("unanswerable"), preds("unanswerable"))["correct"] == 1  # lower case passes


# REC grounding --------------------------------------------------------------------------


def test_parse_box_official_drops_first_and_last_character():
    # brackets removed, then [1:-1]: "0.12, 0.34, 0.56, 0.78" -> ".12, 0.34, 0.56, 0.7"
    assert S.parse_box("[0.12, 0.34, 0.56, 0.78]") == [0.12, 0.34, 0.56, 0.7]
    assert S.parse_box("[[0.1, 0.2, 0.5, 0.6]]") == [0.1, 0.2, 0.5, 0.0]  # "0.6" -> "0." = 0.0
    assert S.parse_box("0.1, 0.2, 0.5, 0.6") == [0.1, 0.2, 0.5, 0.0]
    assert S.parse_box("box: [0.1, 0.2, 0.5, 0.6]") is None  # "ox: 0.1" is not a float
    assert S.parse_box("[0.1, 0.2, 0.5]") is None  # three numbers
    # robust parsing (official_parse=False): the first four numbers
    assert S.parse_box("box: [0.1, 0.2, 0.5, 0.6] done", official=False) == [0.1, 0.2, 0.5, 0.6]


def test_box_iou_hand_computed():
    assert S.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # overlap 0.5 x 1 = 0.5, union 1 + 1 - 0.5 = 1.5
    assert math.isclose(S.box_iou([0, 0, 1, 1], [0.5, 0, 1.5, 1]), 1 / 3)
    assert S.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert S.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union


def test_rec_accuracy_iou_above_half():
    gold = qs(None, None, None, None, answer_bbox="[0.1, 0.1, 0.5, 0.5]")
    # 1: exact, with a trailing digit the official parse cuts: "0.500" -> "0.50": IoU 1
    # 2: y2 "0.55" read as "0.5" -> same box: IoU 1
    # 3: shifted box [0.2,0.1,0.6,0.5]: overlap .3*.4=.12, union .16+.16-.12=.20 -> 0.6 > 0.5
    # 4: unparsable text: wrong
    p = preds("[0.10, 0.10, 0.50, 0.500]", "[0.10, 0.10, 0.50, 0.55]", "[0.20, 0.10, 0.60, 0.500]", "none")
    r = S.rec(gold, p)
    assert (r["correct"], r["n"]) == (3, 4)
    # gold from "answer" when there is no answer_bbox; exactly IoU 0.5 is not > 0.5
    half = S.rec(qs("[0.0, 0.0, 1.0, 1.0]"), preds("[0.0, 0.0, 0.5, 1.00]"))  # parsed [.0,0,.5,1.0]: IoU .5
    assert half["correct"] == 0


# Captions (pycocoevalcap; Java) ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's METEOR and tokenizer need Java")
def test_caption_metrics_hand_computed():
    refs = {0: ["A red dog runs."], 1: ["two blue cats sleep"]}
    exact = S.caption_scores(refs, {0: "a red dog runs", 1: "Two blue cats sleep."})
    meteor_pid = S._METEOR.meteor_p.pid  # one METEOR JVM, shared by every call in this process
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert exact[k] == pytest.approx(1.0, abs=1e-6), k
    # CIDEr: every n-gram occurs in 1 of 2 reference sets, idf = log 2 for all, candidate
    # vector == reference vector: cosine 1 for n = 1..4, times 10
    assert exact["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert 0.9 < exact["METEOR"] <= 1.0  # exact match, minus METEOR's fragmentation penalty

    part = S.caption_scores({0: ["a red dog runs"]}, {0: "a red dog sleeps"})
    # n-gram precisions 3/4, 2/3, 1/2, 0/1; brevity penalty 1
    assert part["Bleu_1"] == pytest.approx(0.75, abs=1e-6)
    assert part["Bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert part["Bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert part["Bleu_4"] < 1e-3
    # ROUGE-L: LCS 3, P = R = 3/4 -> F_beta = 3/4 for any beta
    assert part["ROUGE_L"] == pytest.approx(0.75, abs=1e-6)
    assert part["METEOR"] < exact["METEOR"]

    # the task score is the mean of the seven metrics, in percent; references either
    # from the COCO file (positional) or from each question's answer (string or list)
    gold = [{"question_id": "x", "answer": "A red dog runs."}, {"question_id": "y", "answer": ["two blue cats sleep"]}]
    r = S.caption(gold, {"x": "a red dog runs", "y": "Two blue cats sleep."})
    assert r["score"] == pytest.approx(sum(100 * v for v in exact.values()) / 7, abs=1e-4)
    r2 = S.caption(gold, {"x": "a red dog runs", "y": "Two blue cats sleep."},
                   references={"x": ["A red dog runs."], "y": ["two blue cats sleep"]})  # fmt: skip
    assert r2["score"] == pytest.approx(r["score"], abs=1e-9)
    assert S._METEOR.meteor_p.pid == meteor_pid and S._METEOR.meteor_p.poll() is None
    proc = S._METEOR.meteor_p
    S.close_meteor()
    assert S._METEOR is None and proc.poll() is not None  # stopped (at exit too); the next call starts one


# Registry --------------------------------------------------------------------------------


def test_registry_is_mm_mergebench():
    reg = load_registry()
    assert [t.name for t in reg.select(["seen"])] == [
        "scienceqa", "imagenet", "vqav2", "grounding", "ocrvqa", "flickr30k", "vizwiz_caption", "iconqa"]  # fmt: skip
    assert [t.name for t in reg.select(["unseen"])] == ["imagenet_r", "aokvqa", "screen2words", "tabmwp"]
    assert {t.scorer for t in reg.tasks.values()} == set(S.SCORERS)
    inet = reg.tasks["imagenet"]
    q = build_question("What is the object in the image?\nAnswer the question using a single word or phrase.",
                       inet.text, inet.prompt_suffix)  # fmt: skip
    assert q.startswith("What is the object in the image?\nChoose an answer from the choices below: Doormat,")
    assert reg.tasks["vqav2"].prompt_suffix == "" and reg.tasks["ocrvqa"].max_new_tokens == 128
