"""``robustmerge demo --compare``: every merge method on adapters trained offline, scored per task.

Trains one LoRA adapter per toy task on the tiny Llama (:mod:`.toy`), merges them with
each method (and a small sweep of RobustMerge's ``lam`` and ``density`` and the baselines'
``density``), scores every merged model on every task by next-token accuracy
(:mod:`.scoring`), normalises by the individual adapter's accuracy (the paper's
"normalised performance"), and measures each merged adapter with :func:`analyze`.
Writes ``compare.json``, ``compare.md`` and one chart, ``compare.png``.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from typing import Any

import torch

from .. import merge
from ..analysis import analyze
from .scoring import task_accuracy, train_pairs, with_adapter
from .toy import tiny_llama

# (label, method, options). RobustMerge's defaults are the paper's (lam 2, density 0.2).
RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("robustmerge", "robustmerge", {}),
    ("robustmerge lam=1", "robustmerge", {"lam": 1.0}),
    ("robustmerge lam=0.5", "robustmerge", {"lam": 0.5}),
    ("robustmerge d=0.5", "robustmerge", {"density": 0.5}),
    ("robustmerge lam=1 d=0.5", "robustmerge", {"lam": 1.0, "density": 0.5}),
    ("robustmerge lam=0.5 d=0.5", "robustmerge", {"lam": 0.5, "density": 0.5}),
    ("robustmerge lam=0.5 d=1", "robustmerge", {"lam": 0.5, "density": 1.0}),
    ("robustmerge lam=0.25 d=1", "robustmerge", {"lam": 0.25, "density": 1.0}),
    ("task_arithmetic", "task_arithmetic", {}),
    ("task_arithmetic w=1/T", "task_arithmetic", {"weights": "1/T"}),
    ("ties", "ties", {}),
    ("ties d=0.5", "ties", {"density": 0.5}),
    ("ties w=1/T", "ties", {"weights": "1/T"}),
    ("dare_ties d=0.5", "dare_ties", {"density": 0.5}),
    ("magnitude_prune", "magnitude_prune", {}),
    ("magnitude_prune d=0.5", "magnitude_prune", {"density": 0.5}),
    ("cat", "cat", {}),
    ("cat w=1/T", "cat", {"weights": "1/T"}),
    ("svd", "svd", {}),
    ("pcb", "pcb", {}),
)
TRAIN = {"steps": 60, "lr": 1e-2, "r": 8}


def _options(opts: dict[str, Any], tasks: int) -> dict[str, Any]:
    if opts.get("weights") == "1/T":
        return {**opts, "weights": [1.0 / tasks] * tasks}
    return opts


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_compare(
    tasks: int = 4,
    steps: int | None = None,
    out: str | None = None,
    runs=RUNS,
    echo=print,
    plot: bool = True,
    shared_init: bool = True,
) -> dict[str, Any]:
    """Train, merge with every run, score, analyse; write the report into ``out`` if given.

    ``shared_init=False`` trains each task from its own LoRA initialisation (see
    :func:`.scoring.train_pairs`)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest, and fair on a shared machine
    try:
        return _run(tasks, steps or TRAIN["steps"], out, runs, echo, plot, shared_init)
    finally:
        torch.set_num_threads(threads)


def _run(tasks, steps, out, runs, echo, plot, shared_init) -> dict[str, Any]:
    start = time.perf_counter()
    base = tiny_llama()
    vocab = base.config.vocab_size
    pairs = train_pairs(base, tasks, steps=steps, lr=TRAIN["lr"], r=TRAIN["r"], shared_init=shared_init)
    init = "one LoRA init" if shared_init else "one LoRA init per task"
    echo(f"trained {tasks} adapters ({steps} steps, lr {TRAIN['lr']}, r {TRAIN['r']}, {init}) "
         f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    base_acc = [task_accuracy(base, t, vocab) for t in range(tasks)]
    individual = [task_accuracy(with_adapter(base, *pairs[t]), t, vocab) for t in range(tasks)]
    rows = []
    merged_pairs = []
    for label, method, opts in runs:
        merged = merge(pairs, method=method, **_options(opts, tasks))
        model = with_adapter(base, dict(merged), merged.config)
        acc = [task_accuracy(model, t, vocab) for t in range(tasks)]
        norm = [a / i if i > 0 else None for a, i in zip(acc, individual)]
        valid = [x for x in norm if x is not None]
        rows.append({"label": label, "method": method, "options": opts, "accuracy": acc, "normalised": norm,
                     "normalised_mean": sum(valid) / len(valid) if valid else None})  # fmt: skip
        merged_pairs.append((dict(merged), merged.config))
    labels = [f"task{t}" for t in range(tasks)]
    analysis = analyze(pairs, merged_pairs, labels=labels, merged_labels=[r["label"] for r in rows])
    for row in rows:
        row["analysis"] = analysis.summary["merged"][row["label"]]["mean"]
    result = {
        "tasks": tasks,
        "train": {**TRAIN, "steps": steps, "shared_init": shared_init},
        "base": base_acc,
        "individual": individual,
        "runs": rows,
        "interference": analysis.summary["interference"]["adapter_cosine"],
        "machine": {"cpu": _cpu_name(), "torch_threads": 1},
        "seconds": time.perf_counter() - start,
    }
    for line in table(result):
        echo(line)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(table(result)) + "\n")
        if plot:
            from .compare_plot import plot_compare

            plot_compare(result, os.path.join(out, "compare.png"))
        analysis.write(os.path.join(out, "analysis"), plots=plot)
        echo(f"wrote {out}/compare.md, compare.json, compare.png and analysis/")
    echo(f"comparison finished in {time.perf_counter() - start:.1f} s")
    return result


def _f(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(result: dict[str, Any]) -> list[str]:
    """The markdown table: normalised accuracy per task, its mean, and the analyze metrics."""
    T = result["tasks"]
    head = [
        "method",
        *[f"task {t}" for t in range(T)],
        "mean",
        "dir. head",
        "dir. tail",
        "ret. head",
        "ret. tail",
        "coef.",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| base (accuracy) | " + " | ".join(_f(x) for x in result["base"]) + " | | | | | | |")
    lines.append("| individual (accuracy) | " + " | ".join(_f(x) for x in result["individual"]) + " | | | | | | |")
    for row in result["runs"]:
        a = row["analysis"]
        cells = [row["label"], *(_f(x) for x in row["normalised"]), f"**{_f(row['normalised_mean'])}**"]
        cells += [
            _f(a[k])
            for k in ("direction_head", "direction_tail", "retention_head", "retention_tail", "adapter_coefficient")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
