"""PNG plots of an analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xs(values: list[Any]) -> tuple[list[int], list[float]]:
    pts = [(i + 1, v) for i, v in enumerate(values) if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_spectra(data: dict[str, Any], path: str) -> None:
    plt = _plt()
    s, k = data["summary"], data["top_k"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, v in s["tasks"].items():
        x, y = _xs(v["spectrum"])
        ax.plot(x, y, marker="o", ms=3, label=t)
    ax.axvline(k + 0.5, color="grey", ls=":", lw=1)
    ax.text(k + 0.6, 0.98, "tail", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("singular index i")
    ax.set_ylabel("s_i / s_1 (mean over modules)")
    ax.set_title("Singular value spectrum of each task's delta")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kept(data: dict[str, Any], path: str) -> None:
    """Directional similarity and retention vs singular index, one line per merged adapter."""
    plt = _plt()
    s, k = data["summary"], data["top_k"]
    many = len(s["merged"]) > 6
    fig, axes = plt.subplots(1, 2, figsize=(14 if many else 11, 4.2))
    cmap = plt.get_cmap("tab20" if len(s["merged"]) > 10 else "tab10")
    for n_m, (m, v) in enumerate(s["merged"].items()):
        style = {"color": cmap(n_m % cmap.N), "ls": "-" if n_m < cmap.N else "--"}
        for ax, key in zip(axes, ("direction", "retention")):
            per_task = [v["tasks"][t][key] for t in data["tasks"]]
            n = max(len(p) for p in per_task)
            mean = []
            for i in range(n):
                vals = [p[i] for p in per_task if i < len(p) and p[i] is not None]
                mean.append(sum(vals) / len(vals) if vals else None)
            x, y = _xs(mean)
            ax.plot(x, y, marker="o", ms=3, label=m, **style)
    for ax, title, ylabel in (
        (axes[0], "Directional similarity", "|cos(u_i, M v_i)|"),
        (axes[1], "Singular value retention", "u_i^T M v_i / s_i"),
    ):
        ax.axvline(k + 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("singular index i of each task (head | tail)")
        ax.set_ylabel(ylabel + " (mean over tasks, modules)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="black", lw=0.8)
    axes[0].set_ylim(0, 1.02)
    if many:  # beside the plots, where it hides no line
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[1].legend(fontsize=7)
    fig.suptitle("What the merged adapters keep of each task's singular directions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heatmap(ax, matrix, labels, title, vmin, vmax, cmap):
    import numpy as np

    arr = np.array([[np.nan if x is None else x for x in row] for row in matrix], dtype=float)
    im = ax.imshow(arr, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(labels) <= 10:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if not np.isnan(arr[i, j]):
                    ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=6)
    return im


def plot_interference(data: dict[str, Any], path: str) -> None:
    plt = _plt()
    s, k, tasks = data["summary"]["interference"], data["top_k"], data["tasks"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    im = _heatmap(axes[0], s["adapter_cosine"], tasks, "cosine of task deltas (whole adapter)", -1, 1, "coolwarm")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    im = _heatmap(axes[1], s["overlap_left"], tasks, f"top-{k} output subspace overlap", 0, 1, "viridis")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    im = _heatmap(axes[2], s["overlap_right"], tasks, f"top-{k} input subspace overlap", 0, 1, "viridis")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle("Task interference (mean over modules)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(data: dict[str, Any], out: str) -> dict[str, str]:
    files = {"spectra": os.path.join(out, "spectra.png")}
    plot_spectra(data, files["spectra"])
    if len(data["tasks"]) > 1:
        files["interference"] = os.path.join(out, "interference.png")
        plot_interference(data, files["interference"])
    if data["merged"]:
        files["kept"] = os.path.join(out, "kept.png")
        plot_kept(data, files["kept"])
    return files
