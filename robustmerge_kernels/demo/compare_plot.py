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
    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(14, 0.34 * len(runs) + 1.8), sharey=True, gridspec_kw={"width_ratios": [1.3, 1, 1]}
    )
    means = [r["normalised_mean"] or 0.0 for r in runs]
    colors = ["tab:red" if r["method"] == "robustmerge" else "tab:blue" for r in runs]
    ax1.barh(y, means, color=colors, alpha=0.6)
    for t in range(result["tasks"]):
        ax1.scatter([r["normalised"][t] for r in runs], y, s=12, marker="o", color="black", zorder=3,
                    label="one task" if t == 0 else None)  # fmt: skip
    for yy, m in zip(y, means):
        ax1.text(1.02, yy, f"{m:.2f}", va="center", fontsize=7)
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlim(0, 1.12)
    ax1.set_xlabel("merged accuracy / own adapter's (bar: mean)")
    ax1.set_title("Normalised performance", fontsize=10)
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(axis="x", alpha=0.3)

    def dots(ax, key, name, color, marker):
        xs = [r["analysis"][key] if r["analysis"][key] is not None else float("nan") for r in runs]
        ax.scatter(xs, y, label=name, color=color, marker=marker, s=22)

    dots(ax2, "direction_head", "head (top 4)", "tab:green", "o")
    dots(ax2, "direction_tail", "tail", "tab:green", "x")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("|cos(u_i, M v_i)|, mean over tasks, modules")
    ax2.set_title("Directional similarity", fontsize=10)
    dots(ax3, "retention_head", "retention, head", "tab:purple", "o")
    dots(ax3, "retention_tail", "retention, tail", "tab:purple", "x")
    dots(ax3, "adapter_coefficient", "coefficient <M,dW>/|dW|^2", "tab:orange", "D")
    ax3.set_xscale("log")
    ax3.axvline(1.0, color="black", lw=0.8)
    ax3.set_xlabel("u_i^T M v_i / s_i (log; 1 = kept at full size)")
    ax3.set_title("Singular value retention", fontsize=10)
    for ax in (ax2, ax3):
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    train = result["train"]
    fig.suptitle(
        f"Merging {result['tasks']} LoRA adapters (r={train['r']}, {train['steps']} steps) of a tiny Llama on toy "
        f"tasks: individual accuracy {min(result['individual']):.2f}-{max(result['individual']):.2f}, "
        f"base {max(result['base']):.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
