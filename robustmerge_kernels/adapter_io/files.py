"""Opening an adapter's files: regular files inside the adapter folder, never blocking.

A FIFO or device named as a shard would block ``open()`` forever (or stream without end),
and an index or symlink could point outside the folder. Every input file is opened with
O_NONBLOCK (so a FIFO opens at once) and checked with fstat to be a regular file, and its
real path must lie inside the adapter folder, or in the ``blobs`` folder of a Hugging Face
cache snapshot (``models--x/snapshots/<rev>/file -> ../../blobs/<sha>``), where hub
downloads keep their files.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from ..errors import AdapterError


def _roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(real)), "blobs"))
    return roots


def open_regular(path: str, label: str, folder: str | None = None) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file (inside
    ``folder``, when given). The caller closes it."""
    name = os.path.basename(path)
    if folder is not None:
        real = os.path.realpath(path)
        if not any(real.startswith(root + os.sep) for root in _roots(folder)):
            raise AdapterError(f"{name} resolves to {real!r}, outside the adapter folder {folder!r}", label)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AdapterError(f"missing file {path!r}", label) from None
    except OSError as exc:
        raise AdapterError(f"cannot open {path!r}: {exc.strerror}", label) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise AdapterError(f"{path!r} is {kind}; adapter files must be regular files", label)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: str, label: str, folder: str | None = None) -> None:
    """open_regular for files another library opens by name (torch.load)."""
    os.close(open_regular(path, label, folder))


def read_json(path: str, label: str, folder: str | None = None, limit: int = 64 << 20) -> Any:
    """A JSON file (configs, indexes: small; ``limit`` bounds what a hostile one costs)."""
    fd = open_regular(path, label, folder)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterError(f"{os.path.basename(path)} is {size} bytes, over the {limit >> 20} MiB limit", label)
        chunks, got = [], 0
        while got < size:
            chunk = os.pread(fd, size - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterError(f"cannot parse {os.path.basename(path)}: {reason}", label) from None
