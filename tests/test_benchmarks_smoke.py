"""The benchmark harness must keep working: run its small cases once, untimed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from robustmerge_kernels.demo import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a second pytest process merging the CLIP benchmark shapes: ~15 s idle, 73 s on a busy machine
def test_benchmarks_run_untimed(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-k", "clip", "-q",
         "--bench-csv", str(tmp_path / "bench.csv"), "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def test_synthetic_shapes_match_the_spec_parameter_counts():
    assert round(synthetic.param_count("llava-7b") / 1e6, 1) == 40.0
    assert round(synthetic.param_count("llava-13b") / 1e6, 1) == 62.6


def test_merge_host_cost_runs_and_keeps_hostonly_out_of_the_registry():
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "merge_host_cost.py"), "--shape", "clip-vit-b32", "--T", "2",
         "--rounds", "1", "--partial"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "merge_ms" in proc.stdout and "build_plan_ms" in proc.stdout
    from robustmerge_kernels.backends import registered_backends

    assert "hostonly" not in registered_backends()  # registered by the script's process only
