"""``analyze``: the low-rank metrics against a dense float64 oracle, the CLI's files, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lora_pair

import robustmerge_kernels as rk
from robustmerge_kernels.analysis import metrics
from robustmerge_kernels.cli import main

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _factors(seed, r, m, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g, dtype=F64), torch.randn(m, r, generator=g, dtype=F64)


def _rel(x, y):
    x, y = torch.as_tensor(x, dtype=F64), torch.as_tensor(y, dtype=F64)
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


def _dense_svd(a, b, c):
    u, s, vh = torch.linalg.svd(c * b @ a, full_matrices=False)
    k = a.shape[0]
    return u[:, :k], s[:k], vh[:k].T


@pytest.mark.parametrize("r,m,n", [(4, 12, 9), (6, 7, 20), (3, 30, 30)])
def test_task_svd_and_merged_metrics_match_a_dense_float64_oracle(r, m, n):
    a, b = _factors(1, r, m, n)
    c = 0.7
    svd = metrics.task_svd(a, b, c)
    u, s, v = _dense_svd(a, b, c)
    assert _rel(svd.s, s) < 1e-10
    # singular vectors agree up to a common sign per pair
    sign = torch.sign((svd.u * u).sum(0))
    assert _rel(svd.u * sign, u) < 1e-10 and _rel(svd.v * sign, v) < 1e-10

    am, bm = _factors(2, r + 2, m, n)  # a merged adapter of another rank
    cm = 1.3
    M = cm * bm @ am
    got = metrics.merged_metrics(svd, am, bm, cm)
    mv = M @ v
    proj = (u * mv).sum(0)
    direction = proj.abs() / mv.norm(dim=0)
    retention = proj / s
    dW = c * b @ a
    coefficient = float((M * dW).sum() / (dW * dW).sum())
    assert _rel(got["direction"], direction) < 1e-10
    assert _rel(got["retention"], retention) < 1e-10
    assert abs(got["coefficient"] - coefficient) <= 1e-10 * abs(coefficient)
    assert all(0 <= d <= 1 + 1e-12 for d in got["direction"])

    stats = metrics.spectrum_stats(svd, top_k=2)
    assert abs(stats["energy_top"] - float(s[:2].square().sum() / s.square().sum())) < 1e-12
    assert abs(stats["head_tail_gap"] - float(s[:2].mean() / s[2:].mean())) < 1e-10 * stats["head_tail_gap"]


def test_interference_matches_dense_cosines_and_subspace_overlaps():
    r, m, n, k = 5, 14, 11, 2
    pairs = [_factors(10 + t, r, m, n) for t in range(3)]
    scales = [0.5, 2.0, 1.0]
    svds = [metrics.task_svd(a, b, c) for (a, b), c in zip(pairs, scales)]
    got = metrics.interference(svds, top_k=k)
    dense = [c * b @ a for (a, b), c in zip(pairs, scales)]
    dsvd = [_dense_svd(a, b, c) for (a, b), c in zip(pairs, scales)]
    for i in range(3):
        for j in range(3):
            inner = float((dense[i] * dense[j]).sum())
            cos = inner / float(dense[i].norm() * dense[j].norm())
            assert abs(got["cosine"][i][j] - cos) < 1e-10
            assert abs(got["inner"][i][j] - inner) < 1e-10 * float(dense[i].norm() * dense[j].norm())
            left = float((dsvd[i][0][:, :k].T @ dsvd[j][0][:, :k]).square().sum()) / k
            right = float((dsvd[i][2][:, :k].T @ dsvd[j][2][:, :k]).square().sum()) / k
            assert abs(got["overlap_left"][i][j] - left) < 1e-10
            assert abs(got["overlap_right"][i][j] - right) < 1e-10
    assert abs(got["cosine"][0][0] - 1) < 1e-12 and abs(got["overlap_left"][1][1] - 1) < 1e-12


def test_rank_deficient_task_has_no_direction_in_its_null_space():
    a, b = _factors(3, 4, 9, 8)
    b[:, 2:] = 0  # rank 2
    svd = metrics.task_svd(a, b, 1.0)
    assert svd.valid == 2
    got = metrics.merged_metrics(svd, a, b, 1.0)
    assert got["direction"][2:] == [None, None] and got["retention"][2:] == [None, None]
    assert all(abs(x - 1) < 1e-10 for x in got["retention"][:2])  # the task against itself keeps all
    zero = metrics.task_svd(a, torch.zeros_like(b), 1.0)  # an untrained adapter (B = 0)
    assert zero.valid == 0 and metrics.spectrum_stats(zero, 2)["head_tail_gap"] is None


def _pairs(T=3, dtype=torch.float64):
    return [lora_pair(100 + t, r=4, n=12, m=10, dtype=dtype, alpha=8 + 4 * t) for t in range(T)]


def test_analyze_uses_each_adapters_scaling_and_the_merged_config():
    """Whole-adapter numbers from analyze() equal dense ones computed with PEFT's scaling."""
    tasks = _pairs()
    merged = rk.merge(tasks, method="task_arithmetic")
    res = rk.analyze(tasks, [(dict(merged), merged.config)], merged_labels=["ta"], top_k=2)
    assert res.tasks == ["task0", "task1", "task2"] and res.merged == ["ta"]
    dense = {}
    for t, (sd, cfg) in enumerate(tasks):
        c = cfg["lora_alpha"] / cfg["r"]
        dense[t] = {k[: -len(".lora_A.weight")]: c * sd[k.replace("lora_A", "lora_B")] @ sd[k]
                    for k in sd if k.endswith("lora_A.weight")}  # fmt: skip
    cm = merged.config["lora_alpha"] / merged.config["r"]
    M = {k[: -len(".lora_A.weight")]: cm * merged[k.replace("lora_A", "lora_B")].double() @ merged[k].double()
         for k in merged if k.endswith("lora_A.weight")}  # fmt: skip
    summary = res.summary
    for i in range(3):
        for j in range(3):
            inner = sum(float((dense[i][k] * dense[j][k]).sum()) for k in M)
            ni = sum(float(dense[i][k].square().sum()) for k in M) ** 0.5
            nj = sum(float(dense[j][k].square().sum()) for k in M) ** 0.5
            assert abs(summary["interference"]["adapter_cosine"][i][j] - inner / (ni * nj)) < 1e-10
        coef = sum(float((M[k] * dense[i][k]).sum()) for k in M) / sum(float(dense[i][k].square().sum()) for k in M)
        got = summary["merged"]["ta"]["tasks"][f"task{i}"]["adapter_coefficient"]
        assert abs(got - coef) < 1e-10 * abs(coef)
    mod = res.data["modules"][0]
    assert mod["type"] == "q" and mod["layer"] == 0 and mod["shape"] == [10, 12]


def test_a_merged_adapter_that_keeps_everything_scores_one():
    """cat is exact: B* A* = sum_t dW_t; with orthogonal tasks each keeps direction and value 1."""
    n = m = 12
    tasks = []
    for t in range(3):  # disjoint input and output coordinates: orthogonal deltas
        a = torch.zeros(4, n, dtype=F64)
        b = torch.zeros(m, 4, dtype=F64)
        g = torch.Generator().manual_seed(t)
        a[:, 4 * t : 4 * t + 4] = torch.randn(4, 4, generator=g, dtype=F64)
        b[4 * t : 4 * t + 4, :] = torch.randn(4, 4, generator=g, dtype=F64)
        tasks.append(({"base_model.model.l.0.q.lora_A.weight": a, "base_model.model.l.0.q.lora_B.weight": b},
                      {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}))  # fmt: skip
    cat = rk.merge(tasks, method="cat")
    res = rk.analyze(tasks, [(dict(cat), cat.config)], top_k=2)
    for t in res.tasks:
        kept = res.summary["merged"]["merged0"]["tasks"][t]
        assert all(abs(x - 1) < 1e-10 for x in kept["direction"] + kept["retention"])
    cos = res.summary["interference"]["adapter_cosine"]
    assert abs(cos[0][1]) < 1e-12 and abs(cos[0][0] - 1) < 1e-12


def test_analyze_refuses_mismatched_inputs():
    tasks = _pairs(2)
    other_shape = lora_pair(7, r=4, n=13, m=10)
    with pytest.raises(rk.AdapterError, match="base layer shape differs"):
        rk.analyze([tasks[0], other_shape])
    with pytest.raises(rk.AdapterError, match=r"adapter #2.*13 in the task adapters|is 10 x 13 here"):
        rk.analyze(tasks, [other_shape])
    missing = lora_pair(8, r=4, n=12, m=10, modules=("q",))
    with pytest.raises(rk.AdapterError, match=r"adapter #2.*no LoRA factors for module .*\.v'"):
        rk.analyze(tasks, [missing])
    with pytest.raises(rk.AdapterError, match=r"adapter #2.*no LoRA config"):
        rk.analyze(tasks, [tasks[0][0]])  # a bare state dict: its scaling is unknown
    with pytest.raises(rk.AdapterError, match="non-empty list"):
        rk.analyze([])
    with pytest.raises(rk.AdapterError, match="top_k"):
        rk.analyze(tasks, top_k=0)


def test_cli_analyze_writes_json_markdown_and_plots(tmp_path, capsys):
    folders = []
    for t, (sd, cfg) in enumerate(_pairs(3, torch.float32)):
        folders.append(str(tmp_path / f"task{t}"))
        rk.merge([(sd, cfg)], method="cat", out=folders[-1])  # a PEFT folder holding exactly this adapter
    merged = str(tmp_path / "rm")
    assert main(["merge", *folders, "-o", merged, "-q", "--lam", "1"]) == 0
    out = tmp_path / "report"
    assert main(["analyze", *folders, "--merged", merged, "-o", str(out), "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "analysis.md" in printed
    data = json.loads((out / "analysis.json").read_text())
    assert data["tasks"] == ["task0", "task1", "task2"] and data["merged"] == ["rm"]
    assert len(data["modules"]) == 2 and set(data["modules"][0]["merged"]["rm"]) == set(data["tasks"])
    md = (out / "analysis.md").read_text()
    assert "## What each merged adapter keeps" in md and "| rm |" in md
    for name in ("spectra.png", "interference.png", "kept.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", folders[0], "--merged", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "adapter #1" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_llava_7b_shaped_t8_in_seconds():
    import time

    from robustmerge_kernels.demo.synthetic import synthetic_adapters

    tasks = synthetic_adapters("llava-7b", 8, rank=16, layers=4)
    merged = rk.merge(tasks)
    start = time.perf_counter()
    res = rk.analyze(tasks, [(dict(merged), merged.config)])
    assert len(res.data["modules"]) == 28
    assert time.perf_counter() - start < 30  # the whole 32 layers take ~8x this; see README


def test_with_adapter_computes_what_peft_computes(base_model, trained_models):
    from peft import get_peft_model_state_dict

    from robustmerge_kernels.demo.scoring import with_adapter
    from robustmerge_kernels.demo.toy import task_batch

    model = trained_models[1]
    patched = with_adapter(base_model, get_peft_model_state_dict(model), model.peft_config["default"].to_dict())
    ids = task_batch(1, base_model.config.vocab_size, batch=4)
    with torch.no_grad():
        assert torch.allclose(patched(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_compare_scores_every_run_and_writes_its_report(tmp_path):
    from robustmerge_kernels.demo.compare import RUNS, run_compare

    runs = [r for r in RUNS if r[0] in ("robustmerge", "cat w=1/T")]
    lines = []
    result = run_compare(tasks=2, steps=3, out=str(tmp_path), runs=runs, echo=lines.append)
    assert [r["label"] for r in result["runs"]] == ["robustmerge", "cat w=1/T"]
    for row in result["runs"]:
        assert row["normalised"] == [a / i for a, i in zip(row["accuracy"], result["individual"])]
        assert set(row["analysis"]) >= {"direction_head", "direction_tail", "retention_tail", "adapter_coefficient"}
    assert any(line.startswith("| cat w=1/T |") for line in lines)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "compare.json").read_text())["tasks"] == 2
    assert (tmp_path / "analysis" / "analysis.md").exists()
