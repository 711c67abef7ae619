"""The command line: merge, errors as exit code 2, backends, and the offline demo."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels.cli import main


def test_cli_merge_writes_the_same_adapter_as_the_api(adapter_dirs, base_model, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", *adapter_dirs, "-o", str(out), "--density", "0.3", "--lam", "1.5", "--clamp-quantile", "0.5"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("merged 3 adapters with robustmerge: 14 modules") and "backend cpu" in line
    expected = rk.merge(adapter_dirs, density=0.3, lam=1.5, clamp_quantile=0.5)
    written = load_file(str(out / "adapter_model.safetensors"))
    assert all(expected[k].equal(written[k]) for k in expected) and written.keys() == expected.keys()
    PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))


def test_cli_dtype_and_overwrite(adapter_dirs, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["merge", *adapter_dirs[:2], "-o", out, "--dtype", "bf16", "-q"]) == 0
    assert {str(v.dtype) for v in load_file(os.path.join(out, "adapter_model.safetensors")).values()} == {
        "torch.bfloat16"
    }
    assert main(["merge", *adapter_dirs[:2], "-o", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", *adapter_dirs[:2], "-o", out, "--overwrite"]) == 0


def test_cli_errors_exit_2_with_a_message(adapter_dirs, tmp_path, capsys):
    assert main(["merge", adapter_dirs[0], str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustmerge: error: adapter #1") and "no such adapter folder" in err
    assert main(["merge", adapter_dirs[0], "-o", str(tmp_path / "o"), "--density", "0"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_backends_lists_reference(capsys):
    assert main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_offline_end_to_end(tmp_path):
    """The main job: the console script with no arguments trains, merges and reloads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "robustmerge")
    proc = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "peft loaded the merged adapter; max |delta - (B* @ A*) * scaling| = 0" in out
    assert "merged 3 adapters with robustmerge: 14 modules" in out
    losses = {
        line.split()[0] + line.split()[1]: line.split()[-3:] for line in out.splitlines() if line.startswith("adapter ")
    }
    # Each trained adapter is best on its own task: the training in the demo is real.
    for task, (name, values) in enumerate(sorted(losses.items())):
        assert min(range(3), key=lambda t: float(values[t])) == task, (name, values)
    # ... and clearly beats the base on it (next-token accuracy), and the demo says what the merge keeps
    acc = {line.split("  ")[1].strip(): [float(x) for x in line.split()[-3:]] for line in out.splitlines()
           if line.startswith("  base") or line.startswith("  adapter ")}  # fmt: skip
    for task in range(3):
        assert acc[f"adapter {task}"][task] > acc["base"][task] + 0.5, acc
    assert "the merged adapter keeps " in out and "% of task 2" in out


@pytest.mark.slow
def test_python_dash_m_and_demo_output_folder(tmp_path):
    out = tmp_path / "kept"
    proc = subprocess.run(
        [sys.executable, "-m", "robustmerge_kernels", "demo", "--tasks", "2", "--steps", "5", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "adapter_config.json").exists() and (out / "robustmerge.json").exists()
    assert main(["demo", "--tasks", "2", "--steps", "1", "-o", str(out)]) == 2  # never replaced silently


def test_demo_trains_on_one_torch_thread_and_restores_the_count(monkeypatch):
    from robustmerge_kernels.demo import offline

    seen = []

    def stop_training(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop here")

    monkeypatch.setattr(offline, "train_adapter", stop_training)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            offline.run_demo(tasks=1, steps=1, echo=lambda *_: None)
        assert seen == [1] and torch.get_num_threads() == 2  # restored even when the demo fails
    finally:
        torch.set_num_threads(before)
