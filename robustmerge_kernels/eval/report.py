"""``robustmerge eval-report``: one markdown table and one PNG bar chart from run folders.

Rows: zero-shot (runs without an adapter), individual (each task's column taken from the
run whose ``adapter_task`` is that task: the adapter trained on it), then one row per
merged adapter (labelled by its method or ``--name``). Columns: every task in registry
order, then the seen mean and the unseen mean (over the tasks that row has; a mean over
an incomplete group is marked with ``*``). A score over part of a task's questions
(``--limit``, an unfinished or partly gathered run) is marked with ``†`` and its n given
under the table; the chart draws the same marks, and no bar (``n/a``) where a row has no
value. Two runs with one label get their folder names added, never a merged row.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .runner import RESULTS, RUN
from .tasks import load_registry

DAGGER = "\u2020"


class Score(float):
    """A task's score with what it was computed over (n, questions, complete)."""

    complete: bool = True
    note: str = ""


def _score(res: dict) -> Score:
    s = Score(float(res["score"]))
    # results.json written before completeness was recorded count as complete
    s.complete = bool(res.get("complete", True))
    if not s.complete:
        limit = f", --limit {res['limit']}" if res.get("limit") is not None else ""
        s.note = f"{res.get('answered', res.get('n'))} of {res.get('questions', '?')} questions{limit}"
    return s


def _load_run(folder: str) -> tuple[dict, dict[str, float]]:
    path = os.path.join(folder, RUN)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {RUN}; not an eval run folder")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    scores = {}
    for name in sorted(os.listdir(folder)):
        res = os.path.join(folder, name, RESULTS)
        if os.path.isfile(res):
            with open(res, encoding="utf-8") as f:
                scores[name] = _score(json.load(f))
    return run, scores


def collect(run_dirs: list[str]) -> list[tuple[str, dict[str, float]]]:
    """(row label, task -> score) rows in table order."""
    zero, individual, merged = [], {}, []
    where: dict[str, str] = {}
    for folder in run_dirs:
        run, scores = _load_run(folder)
        if run["kind"] == "zero-shot":
            zero.append((run["label"], scores, folder))
        elif run["kind"] == "individual":
            task = run.get("adapter_task")
            if task in scores:
                if task in individual:
                    raise ValueError(f"two individual runs for {task}: {where[task]} and {folder}; pass one")
                individual[task], where[task] = scores[task], folder
        else:
            merged.append((run["label"], scores, folder))
    rows = _unique(zero)
    if individual:
        rows.append(("individual", individual))
    return rows + _unique(merged)


def _unique(rows: list[tuple[str, dict, str]]) -> list[tuple[str, dict]]:
    """Rows with a label shared by several runs are told apart by their folders."""
    labels = [label for label, _, _ in rows]
    out = []
    for label, scores, folder in rows:
        if labels.count(label) > 1:
            print(f"robustmerge eval-report: WARNING: label {label!r} names several runs; "
                  f"adding the folder: {folder}", file=sys.stderr)  # fmt: skip
            label = f"{label} ({os.path.normpath(folder)})"
        out.append((label, scores))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_table(rows, registry=None) -> tuple[list[str], list[list[Any]]]:
    reg = registry or load_registry()
    present = {t for _, scores in rows for t in scores}
    tasks = [t for t in reg.tasks.values() if t.name in present]
    header = ["method", *[t.display for t in tasks], "seen mean", "unseen mean"]
    body = []
    for label, scores in rows:
        line: list[Any] = [label, *[scores.get(t.name) for t in tasks]]
        for group in ("seen", "unseen"):
            members = [t.name for t in reg.tasks.values() if t.group == group]
            have = [scores[m] for m in members if m in scores]
            mean = _mean(have)
            partial = len(have) < len(members) or not all(getattr(v, "complete", True) for v in have)
            line.append(None if mean is None else (mean, partial))
        body.append(line)
    return header, body


def _mark(v) -> str:
    if isinstance(v, tuple):
        return "*" if v[1] else ""
    return DAGGER if isinstance(v, float) and not getattr(v, "complete", True) else ""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, tuple):
        return f"{v[0]:.2f}{_mark(v)}"
    if isinstance(v, float):
        return f"{v:.2f}{_mark(v)}"
    return str(v)


def markdown(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    notes = [f"- {row[0]}, {col}: {v.note}" for row in body for col, v in zip(header[1:], row[1:])
             if isinstance(v, Score) and not v.complete]  # fmt: skip
    if notes:  # below the table, only when there is something partial to say
        lines += ["", f"`{DAGGER}` a score over part of the task's questions (`*`: a mean over an incomplete "
                  f"group: tasks missing or marked `{DAGGER}`):", *notes]  # fmt: skip
    return "\n".join(lines) + "\n"


def bar_chart(header, body, path: str) -> dict[str, list[tuple[str, float | None, str]]]:
    """Draw the chart; returns what was drawn: row -> [(column, bar height or None when no
    bar was drawn, the mark written on it: "", "*", "\u2020" or "n/a")]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = header[1:]
    n = max(len(body), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(cols) + 2), 4.5))
    drawn: dict[str, list[tuple[str, float | None, str]]] = {}
    for i, row in enumerate(body):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        bars = [(x, (v[0] if isinstance(v, tuple) else float(v)), _mark(v)) for x, v in zip(xs, row[1:])
                if v is not None]  # fmt: skip
        # no bar for a missing value (a zero-height bar would read as a score of 0)
        container = ax.bar([b[0] for b in bars], [b[1] for b in bars], width, label=str(row[0]))
        colour = container.patches[0].get_facecolor() if container.patches else None
        for (x, h, mark), patch in zip(bars, container.patches):
            if mark == DAGGER:
                patch.set_hatch("//")
            if mark:
                ax.annotate(mark, (x, h), ha="center", va="bottom", fontsize=8)
        for x, v in zip(xs, row[1:]):
            if v is None:
                ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90, color=colour)
        drawn[str(row[0])] = [(c, None if v is None else (v[0] if isinstance(v, tuple) else float(v)),
                               "n/a" if v is None else _mark(v)) for c, v in zip(cols, row[1:])]  # fmt: skip
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right")
    ax.set_ylabel("score (accuracy %, captions: mean of 7 metrics)")
    ax.set_title("MM-MergeBench")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if any(m for marks in drawn.values() for _, _, m in marks if m in ("*", DAGGER)):
        ax.text(0, -0.3, f"* mean over an incomplete group   {DAGGER} part of the questions only",
                transform=ax.transAxes, fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_report(run_dirs: list[str], out: str = "eval_report", registry: str | None = None) -> tuple[str, str]:
    """Write ``<out>.md`` and ``<out>.png``; returns their paths."""
    reg = load_registry(registry)
    header, body = build_table(collect(run_dirs), reg)
    md_path, png_path = f"{out}.md", f"{out}.png"
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    text = markdown(header, body)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    bar_chart(header, body, png_path)
    return md_path, png_path
