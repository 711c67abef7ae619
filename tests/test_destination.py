"""The output path: nothing the user had is lost, whatever -o names and whenever we die."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
from _files import tiny_folder
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import destination
from robustmerge_kernels.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two(tmp_path):
    return [tiny_folder(tmp_path / "in" / f"a{i}", seed=i) for i in range(2)]


def _tree(path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(path)
        for f in files
    }


# ------------------------------------------------------------------ item 1: what -o may name

def test_empty_output_is_refused_and_the_current_folder_survives(two, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in ("", ".", "  ", str(work)):
        with pytest.raises(rk.AdapterError, match="empty|current folder"):
            rk.merge(two, out=out, overwrite=True)
    assert main(["merge", *two, "-o", "", "--overwrite", "--force"]) == 2
    assert "empty" in capsys.readouterr().err
    assert (work / "precious.txt").read_text() == "keep me"
    monkeypatch.chdir(work.parent)  # the parent of the current folder holds it: refused too
    with pytest.raises(rk.AdapterError, match="current folder"):
        rk.merge(two, out=str(tmp_path.parent), overwrite="force")


@pytest.mark.parametrize("which", ["input", "parent_of_inputs", "symlink_to_input"])
def test_output_naming_an_input_or_its_parent_is_refused(two, tmp_path, which):
    before = _tree(tmp_path / "in")
    out = {"input": two[0], "parent_of_inputs": str(tmp_path / "in"), "symlink_to_input": str(tmp_path / "link")}[which]
    if which == "symlink_to_input":
        os.symlink(two[0], out)
    with pytest.raises(rk.AdapterError, match="input adapter folder|symbolic link"):
        rk.merge(two, out=out, overwrite="force")
    assert _tree(tmp_path / "in") == before


def test_overwrite_replaces_only_an_adapter_folder_unless_forced(two, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(rk.AdapterError, match="not an adapter folder"):
        rk.merge(two, out=str(out), overwrite=True)
    assert main(["merge", *two, "-o", str(out), "--overwrite"]) == 2
    assert (out / "thesis.tex").read_text() == "years of work"
    assert main(["merge", *two, "-o", str(out), "--overwrite", "--force"]) == 0  # asked for explicitly
    assert (out / "adapter_config.json").exists() and not (out / "thesis.tex").exists()
    rk.merge(two, out=str(out), overwrite=True)  # an adapter folder now: replaceable
    (tmp_path / "empty").mkdir()
    rk.merge(two, out=str(tmp_path / "empty"), overwrite=True)  # an empty folder holds nothing to lose
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_output_must_be_a_path(two):
    for bad in (5, None.__class__, b"bytes"):
        with pytest.raises(rk.AdapterError, match="must be a folder path"):
            rk.merge(two, out=bad)


def test_dangling_symlink_output_is_refused_before_merging(two, tmp_path, monkeypatch):
    os.symlink(tmp_path / "nowhere", tmp_path / "out")
    opened = []
    monkeypatch.setattr(rk.api, "open_adapter", lambda *a: opened.append(a))
    with pytest.raises(rk.AdapterError, match="symbolic link"):
        rk.merge(two, out=str(tmp_path / "out"))
    assert opened == []  # refused before any input was read


# ------------------------------------------------------------------ item 2: re-checked at commit

@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "mkdir_fallback"])
@pytest.mark.parametrize("appears", ["full", "empty"])
def test_output_that_appears_during_the_merge_is_never_replaced(two, tmp_path, monkeypatch, renameat2, appears):
    if not renameat2:
        monkeypatch.setattr(destination, "_renameat2", None)
    out = tmp_path / "out"
    real = destination.commit_new

    def racing(tmp, dst):  # another merge (or the user) creates OUT after the start-up check
        os.mkdir(dst)
        if appears == "full":
            (out / "adapter_config.json").write_text('{"theirs": 1}')
        return real(tmp, dst)

    monkeypatch.setattr(destination, "commit_new", racing)
    with pytest.raises(rk.AdapterError, match="appeared while merging"):
        rk.merge(two, out=str(out))
    assert out.is_dir()
    assert os.listdir(out) == ([] if appears == "empty" else ["adapter_config.json"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_two_concurrent_merges_to_one_output_one_fails(two, tmp_path):
    """Both pass the start-up check (the commit is held until both are ready); exactly one
    wins, the other exits 2, and the winner's adapter is intact."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    script = textwrap.dedent(f"""
        import os, sys, time
        from robustmerge_kernels.adapter_io import destination
        real = destination.commit_new
        def held(tmp, dst):
            open({str(gate)!r} + str(os.getpid()), "w").close()
            while len([p for p in os.listdir({str(tmp_path)!r}) if p.startswith("gate")]) < 2:
                time.sleep(0.01)
            return real(tmp, dst)
        destination.commit_new = held
        from robustmerge_kernels.cli import main
        sys.exit(main(["merge", *{two!r}, "-o", {str(out)!r}, "-q"]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 2], [p.stderr.read() for p in procs]
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ------------------------------------------------------------------ item 3: crash-safe replacement

def _die_at(step: str, out, inputs, no_exchange: bool) -> None:
    """Run an overwrite in a child that SIGKILLs itself at ``step`` of the commit."""
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from robustmerge_kernels.adapter_io import destination
        if {no_exchange!r}:
            destination._renameat2 = None
        step, calls = {step!r}, []
        real_rename, real_rmtree = os.rename, shutil.rmtree
        def rename(src, dst):
            calls.append(src)
            if step == "between_renames" and len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst)
        def rmtree(path, *a, **k):
            if step == "before_cleanup":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *a, **k)
        os.rename, shutil.rmtree = rename, rmtree
        import robustmerge_kernels as rk
        rk.merge({inputs!r}, out={str(out)!r}, overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == -9


def test_crash_between_the_two_renames_is_recovered(two, tmp_path, capsys):
    out = tmp_path / "out"
    old = rk.merge(two[:1], out=str(out))
    new = rk.merge(two, out=str(tmp_path / "expected"))
    _die_at("between_renames", out, two, no_exchange=True)
    assert not out.exists()  # the window the journal exists for
    assert main(["recover", str(out)]) == 0
    assert "finished the interrupted replacement" in capsys.readouterr().out
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == new.keys() and all((got[k] == new[k]).all() for k in new) and old.keys() == new.keys()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert not (out / destination.OWNER_NAME).exists()


def test_next_run_finishes_an_interrupted_replacement(two, tmp_path):
    out = tmp_path / "out"
    rk.merge(two[:1], out=str(out))
    _die_at("between_renames", out, two, no_exchange=True)
    rk.merge(two, out=str(out), overwrite=True)  # recovers first, then replaces
    assert (out / "adapter_config.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "journal"])
def test_crash_after_the_swap_leaves_the_new_adapter_and_removable_leftovers(two, tmp_path, no_exchange):
    out = tmp_path / "out"
    rk.merge(two[:1], out=str(out))
    _die_at("before_cleanup", out, two, no_exchange)
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".out.")]
    assert leftovers  # the old adapter, marked as ours
    destination.recover(str(out))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_stale_folders_removed_only_when_ours_and_their_owner_is_dead(two, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    owner = {**destination.owner_record(), "kind": "tmp"}
    for name, record in [(".out.tmp-dead", {**owner, "pid": pid}), (".out.tmp-alive", owner),
                         (".out.tmp-otherhost", {**owner, "pid": pid, "host": "elsewhere"})]:  # fmt: skip
        os.mkdir(tmp_path / name)
        (tmp_path / name / destination.OWNER_NAME).write_text(json.dumps(record))
    os.mkdir(tmp_path / ".out.tmp-unmarked")
    (tmp_path / ".out.tmp-unmarked" / "user_file").write_text("x")
    rk.merge(two, out=str(out))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [
        ".out.tmp-alive", ".out.tmp-otherhost", ".out.tmp-unmarked"
    ]


def test_journal_naming_foreign_folders_is_ignored(two, tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    record = {**destination.owner_record(), "pid": 2**22 + 1, "boot_id": "rebooted", "new": "../victim", "old": "victim"}
    (tmp_path / ".out.swap.json").write_text(json.dumps(record))
    destination.recover(str(out))
    assert victim.is_dir()


# ------------------------------------------------------------------ permissions and OS errors

def test_output_folder_gets_normal_permissions(two, tmp_path):
    old = os.umask(0o022)
    try:
        rk.merge(two, out=str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755


def test_name_too_long_with_the_temp_prefix(two, tmp_path):
    out = tmp_path / ("n" * 250)  # valid, but ".NAME.tmp-XXXXXXXX" would not be
    rk.merge(two, out=str(out))
    assert (out / "adapter_config.json").exists()
    with pytest.raises(rk.AdapterError, match="over this file system"):
        rk.merge(two, out=str(tmp_path / ("n" * 256)))


@contextlib.contextmanager
def _mounted(path, options: str):
    os.makedirs(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path):
    import torch

    big = {"base_model.model.q.lora_A.weight": torch.randn(4, 40000), "base_model.model.q.lora_B.weight": torch.randn(8, 4)}
    ins = [tiny_folder(tmp_path / f"a{i}", tensors=big, config={"peft_type": "LORA", "r": 4, "lora_alpha": 4}) for i in range(2)]
    with _mounted(tmp_path / "small", "size=256k") as small:
        with pytest.raises(rk.AdapterError, match="cannot write the output .*No space left"):
            rk.merge(ins, out=str(small / "out"))
        assert os.listdir(small) == []
        assert main(["merge", *ins, "-o", str(small / "out")]) == 2


def test_disk_full_simulated(two, tmp_path, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(rk.AdapterError, match="No space left"):
        rk.merge(two, out=str(tmp_path / "out"))
    assert [p for p in os.listdir(tmp_path) if p != "in"] == []


def test_read_only_parent(two, tmp_path):
    with _mounted(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(rk.AdapterError, match="Read-only file system"):
            rk.merge(two, out=str(ro / "out"))
