"""The method comparison in one chart: normalised accuracy per method beside what analyze measures."""

from __future__ import annotations

from typing import Any


def plot_compare(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [r["label"] for r in runs]
    y = list(range(len(runs)))[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.36 * len(runs) + 1.6), sharey=True)
    means = [r["normalised_mean"] or 0.0 for r in runs]
    colors = ["tab:red" if r["method"] == "robustmerge" else "tab:blue" for r in runs]
    ax1.barh(y, means, color=colors, alpha=0.6)
    for t in range(result["tasks"]):
        ax1.scatter([r["normalised"][t] for r in runs], y, s=12, marker="o", color="black", zorder=3,
                    label="each task" if t == 0 else None)  # fmt: skip
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlabel("accuracy of the merged model / the task's own adapter (bar: mean over tasks)")
    ax1.set_title("Normalised performance on the toy tasks", fontsize=10)
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(axis="x", alpha=0.3)
    metrics = (
        ("direction_head", "directional similarity, head", "tab:green", "o"),
        ("direction_tail", "directional similarity, tail", "tab:green", "x"),
        ("retention_head", "s.v. retention, head", "tab:purple", "o"),
        ("retention_tail", "s.v. retention, tail", "tab:purple", "x"),
        ("adapter_coefficient", "coefficient <M, dW_t>/|dW_t|^2", "tab:orange", "D"),
    )
    for key, name, color, marker in metrics:
        ax2.scatter([r["analysis"][key] if r["analysis"][key] is not None else float("nan") for r in runs], y,
                    label=name, color=color, marker=marker, s=22)  # fmt: skip
    ax2.axvline(1.0, color="black", lw=0.8)
    ax2.set_xlabel("mean over tasks and modules (1 = the task's direction / magnitude kept)")
    ax2.set_title("What analyze measures in each merged adapter", fontsize=10)
    ax2.legend(fontsize=7, loc="best")
    ax2.grid(axis="x", alpha=0.3)
    train = result["train"]
    fig.suptitle(
        f"{result['tasks']} toy tasks, tiny Llama, LoRA r={train['r']} trained {train['steps']} steps "
        f"(individual accuracy {min(result['individual']):.2f}-{max(result['individual']):.2f}, "
        f"base {max(result['base']):.2f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
