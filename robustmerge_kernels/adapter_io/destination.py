"""Output-path safety: which destinations may be written or replaced, and how.

Rules (each one answers a way a merge once lost data):
  * the output is never empty, the current folder, an input or a folder holding an input
    (``-o "$UNSET" --overwrite`` would otherwise rename the working folder away);
  * ``overwrite`` replaces only an empty folder or one that looks like an adapter (it has
    adapter_config.json), unless ``force`` says otherwise;
  * the destination is re-checked at commit time by the rename itself: without overwrite
    the staged folder is renamed with RENAME_NOREPLACE (or mkdir + rename onto that empty
    folder, where renameat2 is missing), so a folder that appeared meanwhile (a concurrent
    merge's output) is never replaced; with overwrite the two folders are swapped with
    RENAME_EXCHANGE, so OUT exists at every instant. Where the exchange is unsupported, a
    journal beside OUT makes the two-rename swap recoverable (:func:`recover`);
  * hidden ``.OUT.tmp-*``/``.OUT.old-*`` folders carry an owner marker (pid, process start
    time, host, boot id); only folders with our marker whose owner is dead are removed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
from typing import Any

from ..errors import AdapterError
from ..jsonfile import write_json
from .names import CONFIG_NAME

OWNER_NAME = ".robustmerge-owner"  # inside our hidden folders; never in a committed output
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl, other systems
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


class RenameUnsupported(Exception):
    """renameat2 or this flag is not available here (old kernel, libc or file system)."""


def rename2(src: str, dst: str, flags: int) -> None:
    """renameat2(src, dst, flags); OSError on failure, RenameUnsupported when unavailable."""
    if _renameat2 is None:
        raise RenameUnsupported
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise RenameUnsupported
    raise OSError(err, os.strerror(err), dst)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (POSIX persists directory entries only on fsync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ names of hidden folders


def hidden_stem(out: str) -> str:
    """``.NAME`` for the hidden siblings of OUT, shortened (with a hash) when the suffixes
    would push a valid name past the file system's 255-byte limit."""
    name = os.path.basename(out)
    if len(os.fsencode(name)) <= 200:
        return f".{name}"
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    return f".{os.fsencode(name)[:150].decode(errors='ignore')}~{digest}"


def journal_path(out: str) -> str:
    return os.path.join(os.path.dirname(out), f"{hidden_stem(out)}.swap.json")


# ------------------------------------------------------------------ owner markers


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname(), "boot_id": _boot_id()}


def write_owner(folder: str, kind: str) -> None:
    write_json(os.path.join(folder, OWNER_NAME), {**owner_record(), "kind": kind}, atomic=False, indent=None)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner_dead(owner: dict[str, Any] | None) -> bool:
    """True only when we can tell the recorded process is gone: same host, and either the
    machine rebooted since or that pid is not running (or is a different process now)."""
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("boot_id") != _boot_id():
        return True
    pid = owner["pid"]
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    return bool(owner.get("start")) and _start_time(pid) != owner["start"]


# ------------------------------------------------------------------ checks before merging


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def resolve_output(out: Any) -> str:
    """The absolute output path, its parent resolved; refuses non-paths and empty names."""
    if isinstance(out, bytes) or not isinstance(out, (str, os.PathLike)):
        raise AdapterError(f"output must be a folder path (str or os.PathLike), got {type(out).__name__}")
    text = os.fspath(out)
    if not isinstance(text, str) or not text.strip():
        raise AdapterError("output path is empty (an unset shell variable?); refusing to write to the current folder")
    absolute = os.path.abspath(text)
    if absolute == os.sep:
        raise AdapterError("output is the root folder; refusing")
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def check_destination(out: Any, overwrite: bool, inputs=(), force: bool = False) -> str:
    """Refuse early (before any merging) a destination that is unsafe or would fail at the end.

    ``inputs``: the input adapter folders; the output may be none of them nor hold one.
    """
    out = resolve_output(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    if out == os.path.realpath(os.getcwd()) or _is_within(os.path.realpath(os.getcwd()), out):
        raise AdapterError(f"output {out!r} is the current folder or holds it; refusing to write or replace it")
    for folder in inputs:
        real = os.path.realpath(os.fspath(folder))
        if _is_within(real, out if not os.path.islink(out) else os.path.realpath(out)):
            raise AdapterError(f"output {out!r} is an input adapter folder or holds one ({real!r}); refusing")
    if not os.path.isdir(parent):
        raise AdapterError(f"parent folder of output {out!r} does not exist")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise AdapterError(f"output folder name is {len(os.fsencode(name))} bytes, over this file system's {limit}")
    if os.path.islink(out):
        raise AdapterError(f"output {out!r} is a symbolic link; name the folder itself")
    if os.path.lexists(out):
        if not overwrite:
            raise AdapterError(f"output {out!r} already exists; pass overwrite=True (--overwrite) to replace it")
        check_replaceable(out, force)
    return out


def check_replaceable(out: str, force: bool = False) -> None:
    """``overwrite`` replaces an empty folder or an adapter folder; anything else needs force."""
    if os.path.islink(out) or not os.path.isdir(out):
        raise AdapterError(f"output {out!r} exists and is not a folder; refusing to replace it")
    if force:
        return
    try:
        entries = os.listdir(out)
    except OSError as exc:
        raise AdapterError(f"cannot list output {out!r}: {exc.strerror}") from exc
    if entries and CONFIG_NAME not in entries:
        raise AdapterError(
            f"output {out!r} is not an adapter folder (no {CONFIG_NAME}); --overwrite replaces only adapter "
            "folders, so nothing was deleted"
        )


# ------------------------------------------------------------------ commit and recovery


def _drop_marker(folder: str) -> None:
    try:
        os.remove(os.path.join(folder, OWNER_NAME))
    except FileNotFoundError:
        pass
    fsync_dir(folder)


def _settle(out: str, *steps) -> None:
    """Steps after the rename that made OUT the new adapter: the merge has succeeded, so a
    failure here (EIO on fsync, a marker that cannot be removed) is a warning, and what it
    leaves (a stray marker, an old folder) is removed by recover() later."""
    import warnings

    for what, step, *args in steps:
        try:
            step(*args)
        except OSError as exc:
            warnings.warn(f"{out} is complete, but {what} failed after the rename ({exc}); `robustmerge recover "
                          "OUT` or the next merge tidies up", stacklevel=3)  # fmt: skip


def commit_new(tmp: str, out: str) -> None:
    """Rename the staged folder to OUT only if OUT does not exist at that instant. The
    owner marker goes with it and is removed after (a crash in between leaves a stray
    marker in OUT, which recover() removes), so no instant leaves an unmarked staging folder."""
    try:
        rename2(tmp, out, _RENAME_NOREPLACE)
    except RenameUnsupported:
        os.mkdir(out)  # atomic claim of the name; then rename onto the empty folder we made
        try:
            os.rename(tmp, out)
        except OSError:
            try:
                os.rmdir(out)  # only if still empty: what someone else put there stays
            except OSError:
                pass
            raise
    _settle(out, ("syncing the parent folder", fsync_dir, os.path.dirname(out)),
            ("removing the owner marker", _drop_marker, out))  # fmt: skip


def commit_replace(tmp: str, out: str, force: bool = False) -> str:
    """Swap the staged folder with OUT; returns the hidden folder now holding the old
    adapter, marked as ours (the caller deletes it; after a crash recover() does).

    The old adapter is marked before the swap, so at no instant is either folder both
    hidden and unmarked; a marker left in OUT by a crash is removed by recover().
    """
    check_replaceable(out, force)  # again: OUT may have changed during the merge
    parent = os.path.dirname(out)
    try:
        write_owner(out, "old")
    except OSError:
        pass  # OUT's contents are read-only: it can still be replaced, only a crash would leak it
    try:
        rename2(tmp, out, _RENAME_EXCHANGE)  # atomic: OUT names one complete adapter throughout
    except RenameUnsupported:
        pass
    except BaseException:
        _drop_marker(out)  # OUT as the user had it
        raise
    else:
        _settle(out, ("syncing the parent folder", fsync_dir, parent), ("removing the owner marker", _drop_marker, out))
        return tmp
    backup = tmp.replace(".tmp-", ".old-")
    journal = journal_path(out)
    staged_journal = os.path.join(tmp, ".swap.json")  # written in full, then renamed: never partial
    try:
        with open(staged_journal, "w") as f:  # what recover() needs if we die between the renames
            json.dump({**owner_record(), "out": os.path.basename(out), "old": os.path.basename(backup),
                       "new": os.path.basename(tmp)}, f)  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        os.rename(staged_journal, journal)
        fsync_dir(parent)
        os.rename(out, backup)
    except BaseException:
        _drop_marker(out)
        if os.path.exists(journal):
            os.remove(journal)
        raise
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)  # put the user's previous adapter back
        _drop_marker(out)
        os.remove(journal)
        raise
    _settle(out, ("syncing the parent folder", fsync_dir, parent), ("removing the owner marker", _drop_marker, out),
            ("removing the journal", os.remove, journal), ("syncing the parent folder", fsync_dir, parent))  # fmt: skip
    return backup


def remove_ours(folder: str) -> None:
    """Delete a hidden folder, but only if it carries our marker (we created it)."""
    if os.path.isfile(os.path.join(folder, OWNER_NAME)) and not os.path.islink(folder):
        shutil.rmtree(folder, ignore_errors=True)


def recover(out: str) -> list[str]:
    """Finish an interrupted overwrite of OUT and remove hidden folders left by dead merges.

    Returns what was done, one line each. Never touches a folder lacking our marker or one
    whose owner may still be running.
    """
    out = resolve_output(out)
    parent = os.path.dirname(out)
    done: list[str] = []
    journal = journal_path(out)
    entry = _read_json(journal)
    stem = hidden_stem(out)
    names_ok = entry is not None and all(
        isinstance(entry.get(k), str) and entry[k].startswith(stem + suffix) and os.sep not in entry[k]
        for k, suffix in (("new", ".tmp-"), ("old", ".old-"))
    )  # a journal naming anything else is not ours to act on
    if names_ok and owner_dead(entry):
        new, old = os.path.join(parent, str(entry.get("new"))), os.path.join(parent, str(entry.get("old")))
        if not os.path.lexists(out):
            if os.path.isdir(new):  # the new adapter was complete before the first rename
                os.rename(new, out)
                done.append(f"finished the interrupted replacement: {out} is the new adapter")
            elif os.path.isdir(old):
                os.rename(old, out)
                done.append(f"restored the previous adapter to {out}")
            fsync_dir(parent)
            if os.path.isdir(out):
                _drop_marker(out)
        if os.path.lexists(out):
            for leftover in (new, old):  # both named by our journal: the replaced and the staged
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                    done.append(f"removed {leftover} left by the interrupted replacement")
            os.remove(journal)
            fsync_dir(parent)
    stray = os.path.join(out, OWNER_NAME)
    if os.path.isfile(stray) and not os.path.isfile(journal) and owner_dead(_read_json(stray)):
        os.remove(stray)  # a crash just after a commit's rename: OUT is complete
        done.append(f"removed a stale marker from {out}")
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return done
    for name in names:
        if not (name.startswith(stem + ".tmp-") or name.startswith(stem + ".old-")):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path) and owner_dead(_read_json(os.path.join(path, OWNER_NAME))):
            if os.path.isfile(journal):  # an unfinished swap still needs these
                continue
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} left by a merge that is no longer running")
    return done
