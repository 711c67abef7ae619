"""Summaries of the per-module metrics: per task, per merged adapter, per layer and module type.

Means are over modules, each module weighing the same; per-index means skip indices with
no defined direction (``None``). ``adapter_cosine`` and ``adapter_coefficient`` treat each
adapter as one long vector instead (inner products summed over modules), so large
modules weigh more there.
"""

from __future__ import annotations

import statistics
from typing import Any


class _Mean:
    """Running means of per-index lists (lists may differ in length)."""

    def __init__(self) -> None:
        self.sum: list[float] = []
        self.n: list[int] = []

    def add(self, values: list[float | None]) -> None:
        while len(self.sum) < len(values):
            self.sum.append(0.0)
            self.n.append(0)
        for i, v in enumerate(values):
            if v is not None:
                self.sum[i] += v
                self.n[i] += 1

    def result(self) -> list[float | None]:
        return [s / n if n else None for s, n in zip(self.sum, self.n)]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _split(values: list[float | None], k: int) -> tuple[float | None, float | None]:
    return _mean(values[:k]), _mean(values[k:])


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    tasks, merged, top_k = data["tasks"], data["merged"], data["top_k"]
    T = len(tasks)
    index = {t: i for i, t in enumerate(tasks)}
    spectra = {t: _Mean() for t in tasks}
    gaps: dict[str, list[float]] = {t: [] for t in tasks}
    energy: dict[str, list[float]] = {t: [] for t in tasks}
    norm2 = dict.fromkeys(tasks, 0.0)
    cos_sum = [[0.0] * T for _ in range(T)]
    left_sum = [[0.0] * T for _ in range(T)]
    right_sum = [[0.0] * T for _ in range(T)]
    pair_n = [[0] * T for _ in range(T)]
    inner_sum = [[0.0] * T for _ in range(T)]
    mdir = {m: {t: _Mean() for t in tasks} for m in merged}
    mret = {m: {t: _Mean() for t in tasks} for m in merged}
    mcoef: dict[str, dict[str, list[float]]] = {m: {t: [] for t in tasks} for m in merged}
    minner = {m: dict.fromkeys(tasks, 0.0) for m in merged}
    groups: dict[str, dict[Any, dict[str, Any]]] = {"by_type": {}, "by_layer": {}}

    for mod in data["modules"]:
        for t, st in mod["tasks"].items():
            s = st["singular_values"]
            if st["rank"]:
                spectra[t].add([x / s[0] if i < st["rank"] else None for i, x in enumerate(s)])
                energy[t].append(st["energy_top"])
                if st["head_tail_gap"] is not None:
                    gaps[t].append(st["head_tail_gap"])
            norm2[t] += st["frobenius"] ** 2
        inter = mod["interference"]
        names = inter["tasks"]
        offdiag = []
        for a, ta in enumerate(names):
            for b, tb in enumerate(names):
                i, j = index[ta], index[tb]
                cos_sum[i][j] += inter["cosine"][a][b]
                left_sum[i][j] += inter["overlap_left"][a][b]
                right_sum[i][j] += inter["overlap_right"][a][b]
                inner_sum[i][j] += inter["inner"][a][b]
                pair_n[i][j] += 1
                if a < b:
                    offdiag.append(inter["cosine"][a][b])
        per_group: dict[str, list[float | None]] = {}
        for m, per_task in mod["merged"].items():
            for t, mm in per_task.items():
                mdir[m][t].add(mm["direction"])
                mret[m][t].add(mm["retention"])
                if mm["coefficient"] is not None:
                    mcoef[m][t].append(mm["coefficient"])
                minner[m][t] += mm["inner"]
                dh, dt = _split(mm["direction"], top_k)
                rh, rt = _split(mm["retention"], top_k)
                for name, v in (
                    ("direction_head", dh),
                    ("direction_tail", dt),
                    ("retention_head", rh),
                    ("retention_tail", rt),
                ):
                    per_group.setdefault(f"{m}\0{name}", []).append(v)
        for kind, key in (("by_type", mod["type"]), ("by_layer", mod["layer"])):
            if key is None:
                continue
            g = groups[kind].setdefault(key, {"modules": 0, "cosine": [], "merged": {}})
            g["modules"] += 1
            g["cosine"].extend(offdiag)
            for compound, vals in per_group.items():
                m, name = compound.split("\0")
                g["merged"].setdefault(m, {}).setdefault(name, []).extend(vals)

    def avg(mat_sum):
        return [[mat_sum[i][j] / pair_n[i][j] if pair_n[i][j] else None for j in range(T)] for i in range(T)]

    adapter_cos = [
        [inner_sum[i][j] / (norm2[tasks[i]] * norm2[tasks[j]]) ** 0.5 if norm2[tasks[i]] * norm2[tasks[j]] > 0 else None
         for j in range(T)]
        for i in range(T)
    ]  # fmt: skip
    out: dict[str, Any] = {
        "tasks": {
            t: {
                "spectrum": spectra[t].result(),
                "head_tail_gap_median": statistics.median(gaps[t]) if gaps[t] else None,
                "energy_top_mean": _mean(energy[t]),
                "frobenius": norm2[t] ** 0.5,
            }
            for t in tasks
        },
        "interference": {
            "cosine": avg(cos_sum),
            "overlap_left": avg(left_sum),
            "overlap_right": avg(right_sum),
            "adapter_cosine": adapter_cos,
        },
        "merged": {},
    }
    for m in merged:
        per_task = {}
        for t in tasks:
            d, r = mdir[m][t].result(), mret[m][t].result()
            dh, dt = _split(d, top_k)
            rh, rt = _split(r, top_k)
            per_task[t] = {
                "direction": d,
                "retention": r,
                "direction_head": dh,
                "direction_tail": dt,
                "retention_head": rh,
                "retention_tail": rt,
                "coefficient": _mean(mcoef[m][t]),
                "adapter_coefficient": minner[m][t] / norm2[t] if norm2[t] > 0 else None,
            }
        keys = (
            "direction_head",
            "direction_tail",
            "retention_head",
            "retention_tail",
            "coefficient",
            "adapter_coefficient",
        )
        mean = {k: _mean([per_task[t][k] for t in tasks]) for k in keys}
        out["merged"][m] = {"tasks": per_task, "mean": mean}
    for kind in ("by_type", "by_layer"):
        table = {}
        for key in sorted(groups[kind], key=lambda k: (isinstance(k, str), k)):
            g = groups[kind][key]
            table[str(key)] = {
                "modules": g["modules"],
                "cosine_mean": _mean(g["cosine"]),
                "merged": {m: {name: _mean(vals) for name, vals in d.items()} for m, d in g["merged"].items()},
            }
        out[kind] = table
    return out
