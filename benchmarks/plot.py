"""Turn a benchmark CSV (benchmarks/results/*.csv) into a PNG bar chart.

    python benchmarks/plot.py                      # newest CSV in benchmarks/results/
    python benchmarks/plot.py RESULTS.csv -o chart.png

Two panels, one group of bars per case, one bar per backend/baseline: throughput (GB/s of
input read) and time relative to the same session's ``copy`` row (log scale).

matplotlib is optional and not a dependency of the project. Without it this script says so,
prints the same numbers as a text chart and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"case", "backend", "median_s", "gb_s", "ratio_to_copy"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise SystemExit(f"{path}: not a benchmark CSV (empty, or missing columns {sorted(missing)})")
    return rows


def newest_csv() -> Path:
    files = sorted(RESULTS_DIR.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no CSV in {RESULTS_DIR}; run `pytest benchmarks/` first or pass a path")
    return files[-1]


def _num(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def text_chart(rows: list[dict[str, str]], width: int = 40) -> str:
    top = max(_num(r["gb_s"]) for r in rows)
    lines = [f"{'case':<26} {'backend':<13} {'GB/s':>7} {'x copy':>7}  throughput"]
    for r in rows:
        gb = _num(r["gb_s"])
        bar = "#" * max(1, round(width * gb / top)) if top > 0 else ""
        lines.append(f"{r['case']:<26} {r['backend']:<13} {gb:>7.2f} {_num(r['ratio_to_copy']):>7.3g}  {bar}")
    return "\n".join(lines)


def plot(rows: list[dict[str, str]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["backend"] for r in rows))
    by = {(r["case"], r["backend"]): r for r in rows}
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.6 * len(cases) * max(1, len(impls) / 3)), 8), sharex=True)
    for ax, column, label in (
        (axes[0], "gb_s", "GB/s of input read (higher is better)"),
        (axes[1], "ratio_to_copy", "time / time of copy (lower is better)"),
    ):
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(cases))]
            ys = [_num(by[(c, impl)][column]) if (c, impl) in by else math.nan for c in cases]
            ax.bar(xs, ys, width, label=impl)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_xticks(range(len(cases)), cases, rotation=20, ha="right")
    axes[0].legend(ncol=min(len(impls), 4), fontsize="small")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="?", type=Path, help="benchmark CSV (default: newest in benchmarks/results/)")
    ap.add_argument("-o", "--output", type=Path, help="PNG to write (default: the CSV's path with .png)")
    args = ap.parse_args(argv)
    path = args.csv or newest_csv()
    rows = read_rows(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "matplotlib is not installed, so no PNG was written (it is optional: "
            "`pip install matplotlib` to get the chart). The numbers as text:\n",
            file=sys.stderr,
        )
        print(text_chart(rows))
        return 2
    out = args.output or path.with_suffix(".png")
    plot(rows, out, f"robustmerge_kernels benchmarks: {path.name}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
