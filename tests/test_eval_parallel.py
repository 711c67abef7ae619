"""Data-parallel evaluation gives the answers one process gives, gathered in question
order: torchrun with 2 CPU ranks (gloo), and the official --num-chunks/--chunk-idx."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("PIL")

from test_eval_e2e import build_processor, make_bench, tiny_llava  # noqa: E402

from robustmerge_kernels.eval import runner  # noqa: E402
from robustmerge_kernels.eval.shards import get_chunk  # noqa: E402
from robustmerge_kernels.eval.tasks import load_registry  # noqa: E402

TASKS = ["iconqa", "grounding"]
N = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    processor = build_processor()
    tiny_llava(processor).save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    make_bench(str(root / "bench"), load_registry(), TASKS, n=N)
    single = root / "single"
    results = runner.evaluate(str(root / "base"), None, TASKS, str(root / "bench"), str(single), batch_size=2,
                              max_new_tokens=4, quiet=True, device="cpu")  # fmt: skip
    return root, results


def _answers(out, task):
    return [json.loads(x) for x in open(os.path.join(out, task, "answers.jsonl"))]


def test_get_chunk_is_the_official_split():
    items = list(range(5))
    assert [get_chunk(items, 2, k) for k in range(2)] == [[0, 1, 2], [3, 4]]  # ceil(5 / 2) = 3
    assert [get_chunk(items, 4, k) for k in range(4)] == [[0, 1], [2, 3], [4], []]


def test_num_chunks_in_separate_processes_match_one_process(setup):
    root, single = setup
    out = str(root / "chunks")
    kw = dict(batch_size=2, max_new_tokens=4, quiet=True, device="cpu", num_chunks=2)
    first = runner.evaluate(str(root / "base"), None, TASKS, str(root / "bench"), out, chunk_idx=1, **kw)
    assert first == {}  # chunk 1 alone: nothing complete to score yet
    assert not os.path.exists(os.path.join(out, "iconqa", "results.json"))
    second = runner.evaluate(str(root / "base"), None, TASKS, str(root / "bench"), out, chunk_idx=0, **kw)
    assert second == single
    for task in TASKS:
        assert _answers(out, task) == _answers(root / "single", task)
        assert sorted(os.listdir(os.path.join(out, task))) == ["answers.jsonl", "results.json", "settings.json"]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(setup):
    root, single = setup
    out = root / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "robustmerge_kernels", "eval", "--base", str(root / "base"), "--data-root", str(root / "bench"),
           "--tasks", *TASKS, "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4", "-q",
           "--log-samples"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in TASKS:
        assert _answers(out, task) == _answers(root / "single", task)
        assert json.load(open(out / task / "results.json")) == single[task]
        samples = [json.loads(x) for x in open(out / task / "samples.jsonl")]
        assert [s["question_id"] for s in samples] == [f"{task}-{i}" for i in range(N)]
    run = json.load(open(out / "results.json"))
    assert run["settings"]["shards"] == 2 and run["complete"] is True
