"""The output path: nothing the user had is lost, whatever -o names and whenever we die."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from _files import tiny_folder
from safetensors.torch import load_file

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io import destination, writer
from robustmerge_kernels.cli import main


@pytest.fixture
def two(tmp_path):
    return [tiny_folder(tmp_path / "in" / f"a{i}", seed=i) for i in range(2)]


def _tree(path) -> dict[str, bytes]:
    """Every file (and symlink, by its target) under ``path`` with its content."""
    tree = {}
    for d, dirs, files in os.walk(path):
        for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, f)
            tree[os.path.relpath(p, path)] = os.readlink(p).encode() if os.path.islink(p) else open(p, "rb").read()
    return tree


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


def test_two_concurrent_merges_to_one_output_one_fails(two, tmp_path, monkeypatch):
    """Both pass the start-up check (the commit is held until both are ready); exactly one
    wins, the other gets an AdapterError, and the winner's adapter is intact."""
    out, barrier = tmp_path / "out", threading.Barrier(2, timeout=60)
    real = destination.commit_new

    def held(tmp, dst):
        barrier.wait()
        return real(tmp, dst)

    monkeypatch.setattr(destination, "commit_new", held)
    results = []

    def run():
        try:
            rk.merge(two, out=str(out))
            results.append("ok")
        except rk.AdapterError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r == "ok" for r in results) == [False, True], results
    assert "appeared while merging" in next(r for r in results if r != "ok")
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ------------------------------------------------------------------ item 3: crash-safe replacement


class _Killed(Exception):
    pass


def crash_commit(out, tensors, step, no_exchange: bool, nth: int = 1) -> bool:
    """Stage an adapter for OUT in a forked child and SIGKILL the child at the ``nth`` call
    of ``step`` during commit (a real kill -9: no cleanup code runs). True if it died."""
    pid = os.fork()
    if pid == 0:  # child: no torch compute here (fork-safe), only file operations
        try:
            if no_exchange:
                destination._renameat2 = None
            calls = [0]

            def die_on(fn):
                def wrapped(*a, **k):
                    calls[0] += 1
                    if calls[0] == nth:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)

                return wrapped

            staged = writer.StagedAdapter(str(out), overwrite=True)
            staged.write_tensors(tensors)
            staged.write_json("adapter_config.json", {"peft_type": "LORA", "r": 2, "lora_alpha": 4})
            module, name = {"rename": (os, "rename"), "rmtree": (shutil, "rmtree"), "rename2": (destination, "rename2"),
                            "fsync": (os, "fsync"), "remove": (os, "remove"), "mkdir": (os, "mkdir")}[step]  # fmt: skip
            setattr(module, name, die_on(getattr(module, name)))
            staged.commit()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _weights(out) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def test_crash_between_the_two_renames_is_recovered(two, tmp_path, capsys):
    out = tmp_path / "out"
    rk.merge(two[:1], out=str(out))
    new = {"x": torch.arange(3.0)}
    assert crash_commit(out, new, "rename", no_exchange=True, nth=3)  # journal, OUT -> .old, then die
    assert not out.exists()  # the window the journal exists for
    assert main(["recover", str(out)]) == 0
    assert "finished the interrupted replacement" in capsys.readouterr().out
    assert torch.equal(_weights(out)["x"], new["x"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert not (out / destination.OWNER_NAME).exists()


def test_next_run_finishes_an_interrupted_replacement(two, tmp_path):
    out = tmp_path / "out"
    rk.merge(two[:1], out=str(out))
    assert crash_commit(out, {"x": torch.ones(2)}, "rename", no_exchange=True, nth=3)
    rk.merge(two, out=str(out), overwrite=True)  # recovers first, then replaces
    assert len(_weights(out)) == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "journal"])
def test_crash_after_the_swap_leaves_the_new_adapter_and_removable_leftovers(two, tmp_path, no_exchange):
    out = tmp_path / "out"
    rk.merge(two[:1], out=str(out))
    assert crash_commit(out, {"x": torch.ones(2)}, "rmtree", no_exchange)
    assert list(_weights(out)) == ["x"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out.")]  # the old adapter, marked as ours
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
        ".out.tmp-alive",
        ".out.tmp-otherhost",
        ".out.tmp-unmarked",
    ]


def test_journal_naming_foreign_folders_is_ignored(two, tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    record = {
        **destination.owner_record(),
        "pid": 2**22 + 1,
        "boot_id": "rebooted",
        "new": "../victim",
        "old": "victim",
    }
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
    big = {
        "base_model.model.q.lora_A.weight": torch.randn(4, 40000),
        "base_model.model.q.lora_B.weight": torch.randn(8, 4),
    }
    ins = [
        tiny_folder(tmp_path / f"a{i}", tensors=big, config={"peft_type": "LORA", "r": 4, "lora_alpha": 4})
        for i in range(2)
    ]
    with _mounted(tmp_path / "small", "size=256k") as small:
        with pytest.raises(rk.AdapterError, match="cannot write the output .*No space left"):
            rk.merge(ins, out=str(small / "out"))
        assert os.listdir(small) == []
        assert main(["merge", *ins, "-o", str(small / "out")]) == 2
        for method in ("linear", "cat"):  # written by safetensors' own writer, which raises its own error
            with pytest.raises(rk.AdapterError, match="cannot write .*No space left"):
                rk.merge(ins, out=str(small / "out"), method=method)
        llava = tiny_folder(tmp_path / "llava")  # small LoRA factors, a projector larger than the disk
        torch.save(
            {"model.mm_projector.0.weight": torch.randn(100_000)}, os.path.join(llava, "non_lora_trainables.bin")
        )
        with pytest.raises(rk.AdapterError, match="cannot write non_lora_trainables.bin"):
            rk.merge([llava], out=str(small / "out"))
        assert os.listdir(small) == []


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
