"""Distributed merging (robustmerge_kernels.distributed) with real gloo process groups on
the CPU, launched as users launch it: `torchrun --nproc-per-node N -m robustmerge_kernels merge`.

The output must be byte-identical to the single-process merge for any number of ranks,
and a rank that fails or is killed must leave no output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import robustmerge_kernels as rk
from robustmerge_kernels.distributed import owners

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBUSTMERGE_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "robustmerge_kernels", "merge", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _folder_bytes(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _without_volatile(record: bytes) -> dict:
    data = json.loads(record)
    data.pop("ranks", None)  # the one line that says how it was run
    return data


@pytest.fixture(scope="module")
def llava_like_folders(tmp_path_factory):
    """Five adapters with several modules and a non-LoRA tensor, as PEFT folders."""
    root = tmp_path_factory.mktemp("dist-inputs")
    folders = []
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        sd = {}
        for layer in range(3):
            for name, (n, m) in {"q_proj": (48, 48), "up_proj": (48, 96), "down_proj": (96, 48)}.items():
                prefix = f"base_model.model.model.layers.{layer}.mlp.{name}"
                sd[f"{prefix}.lora_A.weight"] = torch.rand(4, n, generator=g) * 2 - 1
                sd[f"{prefix}.lora_B.weight"] = torch.randn(m, 4, generator=g) * 0.1
        sd["base_model.model.model.mm_projector.0.weight"] = torch.randn(32, 16, generator=g)
        folder = root / f"task{t}"
        folder.mkdir()
        save_file(sd, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj", "down_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    return folders


def test_owners_are_contiguous_and_balanced():
    sizes = [5, 1, 1, 1, 8, 2, 2, 4]
    for world in (1, 2, 3, 8, 20):
        own = owners(sizes, world)
        assert own == sorted(own) and 0 <= min(own) and max(own) < world
    assert owners([1] * 6, 3) == [0, 0, 1, 1, 2, 2]
    assert owners([0, 0], 2) == [0, 0]


def test_distributed_needs_a_process_group(llava_like_folders, tmp_path):
    with pytest.raises(rk.AdapterError, match="process group"):
        rk.merge(llava_like_folders, out=str(tmp_path / "o"), distributed=True)
    with pytest.raises(rk.AdapterError, match="method='robustmerge'"):
        rk.merge(llava_like_folders, method="ties", out=str(tmp_path / "o"), distributed=True)


@pytest.mark.slow
def test_byte_identical_for_one_two_and_three_ranks(llava_like_folders, tmp_path):
    single = tmp_path / "single"
    rk.merge(llava_like_folders, out=str(single))
    expected = _folder_bytes(single)
    for nproc in (1, 2, 3):
        out = tmp_path / f"ranks{nproc}"
        proc = _torchrun(nproc, *llava_like_folders, "-o", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = _folder_bytes(out)
        assert got.keys() == expected.keys()
        for name in expected:
            if name == "robustmerge.json":
                assert _without_volatile(got[name]) == _without_volatile(expected[name])
            else:
                assert got[name] == expected[name], f"{name} differs with {nproc} ranks"
        if nproc > 1:
            assert f"({nproc} ranks)" in proc.stdout
            assert proc.stdout.count("merged 5 adapters") == 1  # one summary, from rank 0
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f".ranks{nproc}.")]  # no leftovers


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_and_writes_nothing(llava_like_folders, tmp_path):
    """One input's data is corrupt where only the last rank reads it: every rank exits
    non-zero and no output folder (nor temp folder) is left."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / name).write_bytes(open(os.path.join(llava_like_folders[0], name), "rb").read())
    st = bad / "adapter_model.safetensors"
    data = bytearray(st.read_bytes())
    data[-64:] = b"\xff" * 64  # NaNs in the last tensors of the file
    st.write_bytes(bytes(data))
    out = tmp_path / "merged"
    proc = _torchrun(2, *llava_like_folders, str(bad), "-o", str(out))
    assert proc.returncode != 0
    assert "NaN" in proc.stderr or "nan" in proc.stderr.lower()
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merged.")]


@pytest.mark.slow
def test_a_killed_rank_leaves_no_output_folder(tmp_path):
    """SIGKILL one rank mid-merge (inputs large enough to take a while): torchrun stops the
    others, and the output name never appears (at most a hidden temp folder remains)."""
    from robustmerge_kernels.demo import synthetic

    folders = []
    for i, (sd, config) in enumerate(synthetic.synthetic_adapters("clip-vit-b32", 24, dtype=torch.float32)):
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    out = tmp_path / "merged"
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBUSTMERGE_NUM_THREADS="1", ROBUSTMERGE_BACKEND="reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "robustmerge_kernels", "merge", *folders, "-o", str(out)]  # fmt: skip
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        victim = None
        while time.time() < deadline and victim is None:
            staged = [n for n in os.listdir(tmp_path) if n.startswith(".merged.tmp-")]
            workers = _children(launcher.pid)
            if staged and len(workers) >= 2:
                victim = workers[-1]
            time.sleep(0.05)
        assert victim is not None, "the merge never staged its output"
        os.kill(victim, signal.SIGKILL)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert not out.exists()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []
