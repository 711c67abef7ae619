"""eval-report never hides incomplete data: --limit runs are marked, missing values get no
bar, the chart carries the table's marks, and two runs with one label stay two rows."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("matplotlib")

from robustmerge_kernels.eval.report import bar_chart, build_table, collect, write_report  # noqa: E402

DAGGER = "\u2020"  # marks a score over part of the questions


def _run(root, name, kind, label, scores, adapter_task=None, partial=()):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"kind": kind, "label": label, "adapter_task": adapter_task}, f)
    for task, score in scores.items():
        os.makedirs(os.path.join(folder, task))
        res = {"score": score, "n": 100, "answered": 100, "questions": 100, "limit": None, "complete": True}
        if task in partial:
            res.update(n=2, answered=2, limit=2, complete=False)
        with open(os.path.join(folder, task, "results.json"), "w") as f:
            json.dump(res, f)
    return folder


def test_limit_run_is_marked_in_table_and_chart(tmp_path):
    a = _run(tmp_path, "a", "merged", "ties", {"scienceqa": 60.0, "vqav2": 50.0}, partial=("vqav2",))
    md, png = write_report([a], out=str(tmp_path / "r"))
    text = open(md).read()
    row = text.splitlines()[2]
    assert f"50.00{DAGGER}" in row and "60.00 " in row + " "
    assert "2 of 100 questions, --limit 2" in text
    assert "*" in row.split("|")[-3]  # seen mean includes a partial task
    header, body = build_table(collect([a]))
    drawn = bar_chart(header, body, str(tmp_path / "c.png"))
    marks = dict((c, m) for c, _, m in drawn["ties"])
    assert marks["VQAv2"] == DAGGER and marks["ScienceQA"] == "" and marks["seen mean"] == "*"


def test_missing_values_are_not_zero_height_bars(tmp_path):
    a = _run(tmp_path, "a", "merged", "ties", {"scienceqa": 60.0})
    b = _run(tmp_path, "b", "merged", "ta", {"vqav2": 40.0})
    header, body = build_table(collect([a, b]))
    drawn = bar_chart(header, body, str(tmp_path / "c.png"))
    assert dict((c, (h, m)) for c, h, m in drawn["ties"])["VQAv2"] == (None, "n/a")
    assert dict((c, (h, m)) for c, h, m in drawn["ta"])["VQAv2"] == (40.0, "")


def test_two_runs_with_one_label_stay_two_rows(tmp_path, capsys):
    a = _run(tmp_path, "a", "merged", "robustmerge", {"scienceqa": 60.0})
    b = _run(tmp_path, "b", "merged", "robustmerge", {"scienceqa": 55.0})
    rows = collect([a, b])
    assert len(rows) == 2 and rows[0][0] != rows[1][0]
    assert rows[0][0].endswith(f"({os.path.normpath(a)})") and "several runs" in capsys.readouterr().err
    i1 = _run(tmp_path, "i1", "individual", "x", {"scienceqa": 70.0}, adapter_task="scienceqa")
    i2 = _run(tmp_path, "i2", "individual", "y", {"scienceqa": 71.0}, adapter_task="scienceqa")
    with pytest.raises(ValueError, match="two individual runs for scienceqa"):
        collect([i1, i2])
