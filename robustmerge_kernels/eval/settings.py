"""What a task's answers depend on, so that a resumed run never mixes settings.

``<task>/settings.json`` holds the key its answers were generated under: the content
hashes of the base model and the adapter, the task's registry entry (prompt rule,
preprocessing, scorer ...), the conversation template, ``max_new_tokens``, dtype,
``--limit`` and the versions of the libraries that generate. A run whose key differs is
refused (or, with ``--restart``, the task starts fresh).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

from ..adapter_io.record import HashCache

HASH_CACHE = ".hashes.json"  # in the run folder: record.HashCache (file, size, mtime, inode) -> sha256


def content_hash(path: str | None, cache_dir: str | None = None) -> str | None:
    """sha256 over a model/adapter folder's files (names and bytes), or of a file; a
    hub id (not on disk) is keyed by its name. Hashes of unchanged files (same size and
    mtime) are reused from ``cache_dir/.hashes.json`` (adapter_io.record.HashCache): a 7B
    model is ~14 GB."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"hub:{path}"
    cache = HashCache(os.path.join(cache_dir, HASH_CACHE) if cache_dir else None)
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [(os.path.relpath(os.path.join(root, n), path), os.path.join(root, n))
                      for n in sorted(names) if not n.startswith(".")]  # fmt: skip
    total = hashlib.sha256()
    for rel, full in sorted(files):
        total.update(f"{rel}\0{cache.sha256(full)}\n".encode())
    cache.save()
    return total.hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of what generates and scores answers."""
    from importlib import metadata

    from .._version import __version__

    out: dict[str, str | None] = {"robustmerge_kernels": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft", "pillow", "pycocoevalcap"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def commit() -> str | None:
    """The git commit of this library's checkout (``+dirty`` with local changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def task_key(*, base_hash, adapter_hash, task, conv_mode, image_root, max_new_tokens, dtype, limit) -> dict[str, Any]:
    """The settings a task's answers depend on (generation versions only: a scorer's
    version does not change answers, and results are rescored from them)."""
    v = versions()
    return {
        "base": base_hash, "adapter": adapter_hash, "task": task.spec(), "conv_mode": conv_mode,
        "image_root": image_root, "max_new_tokens": max_new_tokens, "dtype": dtype, "limit": limit,
        "versions": {k: v[k] for k in ("robustmerge_kernels", "torch", "transformers", "peft", "pillow")},
    }  # fmt: skip


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable ``key: old -> new`` for every differing setting."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in differences(a, b)]
        else:
            out.append(f"{k}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}")
    return out
