"""Write an analysis: ``analysis.json`` (every number), ``analysis.md`` (the summary), PNGs."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..errors import AdapterError


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown(analysis) -> str:
    data = analysis.data
    s = data["summary"]
    tasks, merged, k = data["tasks"], data["merged"], data["top_k"]
    out = [
        "# LoRA merge analysis",
        "",
        f"{len(tasks)} task adapters, {len(merged)} merged adapters, {len(data['modules'])} modules; "
        f"head = top {k} singular directions. Computed exactly in the low-rank space "
        f"({analysis.seconds:.1f} s). Definitions: `definitions` in analysis.json.",
        "",
        "## Task spectra",
        "",
        "Singular values of each task's delta, relative to the largest (mean over modules). A large "
        "head/tail gap is what the RobustMerge paper calls fragile: tail directions are easily "
        "overwhelmed when tasks are summed.",
        "",
    ]
    rank = max((len(v["spectrum"]) for v in s["tasks"].values()), default=0)
    shown = list(range(min(rank, 8)))
    out += _table(
        ["task", "‖dW‖_F", "head/tail gap (median)", f"energy in top {k}", *[f"s{i + 1}/s1" for i in shown]],
        [
            [t, _f(v["frobenius"], 4), _f(v["head_tail_gap_median"], 2), _f(v["energy_top_mean"])]
            + [_f(v["spectrum"][i]) if i < len(v["spectrum"]) else "-" for i in shown]
            for t, v in s["tasks"].items()
        ],
    )
    inter = s["interference"]
    out += [
        "",
        "## Task interference",
        "",
        "Cosine of the whole adapters' deltas (off-diagonal: 0 = no interference):",
        "",
    ]
    out += _table(["", *tasks], [[t, *(_f(x) for x in row)] for t, row in zip(tasks, inter["adapter_cosine"])])
    out += ["", f"Overlap of the top-{k} output subspaces (mean over modules; 1 = same directions):", ""]
    out += _table(["", *tasks], [[t, *(_f(x) for x in row)] for t, row in zip(tasks, inter["overlap_left"])])
    if merged:
        out += [
            "",
            "## What each merged adapter keeps",
            "",
            "Directional similarity (|cos| between a task's singular direction u_i and the merged delta "
            "applied to v_i) and singular value retention (u_i^T M v_i / s_i), averaged over tasks and "
            f"modules, split into the head (top {k}) and the tail; coefficient = <M, dW_t>/‖dW_t‖² over "
            "the whole adapter (1: the task is kept at full strength).",
            "",
        ]
        rows = []
        for m in merged:
            v = s["merged"][m]["mean"]
            rows.append([m, *(_f(v[key]) for key in ("direction_head", "direction_tail", "retention_head",
                                                    "retention_tail", "adapter_coefficient"))])  # fmt: skip
        out += _table(
            ["merged", "direction head", "direction tail", "retention head", "retention tail", "coefficient"], rows
        )
        out += ["", "Per task (direction tail / retention tail / coefficient):", ""]
        out += _table(
            ["merged", *tasks],
            [
                [m] + [
                    f"{_f(v['direction_tail'], 2)} / {_f(v['retention_tail'], 2)} / {_f(v['adapter_coefficient'], 2)}"
                    for v in (s["merged"][m]["tasks"][t] for t in tasks)
                ]
                for m in merged
            ],
        )  # fmt: skip
    for kind, title in (("by_type", "module type"), ("by_layer", "layer")):
        table = s[kind]
        if not table:
            continue
        out += ["", f"## By {title}", ""]
        header = [title, "modules", "task cosine (mean)"] + [f"{m}: direction tail" for m in merged]
        rows = [
            [key, str(g["modules"]), _f(g["cosine_mean"])]
            + [_f(g["merged"].get(m, {}).get("direction_tail")) for m in merged]
            for key, g in table.items()
        ]
        out += _table(header, rows)
    if analysis.files:
        pngs = [os.path.basename(p) for kind, p in analysis.files.items() if p.endswith(".png")]
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(out) + "\n"


def write_report(analysis, out: str, plots: bool = True) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        try:
            import matplotlib  # noqa: F401  (optional: only the plots need it)
        except ImportError:
            raise AdapterError("the plots need matplotlib (pip install matplotlib); or write without plots") from None
        from .plots import write_plots

        files.update(write_plots(analysis.data, out))
    json_path = os.path.join(out, "analysis.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({**analysis.data, "seconds": analysis.seconds}, f, indent=1, allow_nan=False)
    files["json"] = json_path
    analysis.files = dict(files)
    md_path = os.path.join(out, "analysis.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(analysis))
    files["markdown"] = md_path
    return files
