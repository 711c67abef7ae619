"""``robustmerge eval-report``: one markdown table and one PNG bar chart from run folders.

Rows: zero-shot (runs without an adapter), individual (each task's column taken from the
run whose ``adapter_task`` is that task: the adapter trained on it), then one row per
merged adapter (labelled by its method or ``--name``). Columns: every task in registry
order, then the seen mean and the unseen mean (over the tasks that row has; a mean over
an incomplete group is marked with ``*``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .runner import RESULTS, RUN
from .tasks import load_registry


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
                scores[name] = float(json.load(f)["score"])
    return run, scores


def collect(run_dirs: list[str]) -> list[tuple[str, dict[str, float]]]:
    """(row label, task -> score) rows in table order."""
    zero, individual, merged = [], {}, []
    for folder in run_dirs:
        run, scores = _load_run(folder)
        if run["kind"] == "zero-shot":
            zero.append((run["label"], scores))
        elif run["kind"] == "individual":
            task = run.get("adapter_task")
            if task in scores:
                individual[task] = scores[task]
        else:
            merged.append((run["label"], scores))
    rows = list(zero)
    if individual:
        rows.append(("individual", individual))
    return rows + merged


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
            line.append(None if mean is None else (mean, len(have) < len(members)))
        body.append(line)
    return header, body


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, tuple):
        return f"{v[0]:.2f}{'*' if v[1] else ''}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def bar_chart(header, body, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = header[1:]
    n = max(len(body), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(cols) + 2), 4.5))
    for i, row in enumerate(body):
        vals = [(v[0] if isinstance(v, tuple) else v) for v in row[1:]]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=str(row[0]))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right")
    ax.set_ylabel("score (accuracy %, captions: mean of 7 metrics)")
    ax.set_title("MM-MergeBench")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
