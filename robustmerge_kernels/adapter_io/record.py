"""The merge record written beside a merged adapter (robustmerge.json).

It names every input with the sha256 of its weight files, the method, hyper-parameters,
backend and library version, so a merged adapter can be traced and reproduced. Hashing
the inputs costs more than merging them (sha256 runs at about 1 GB/s a core; the merge
is near memory speed), so it runs on a background thread while the merge proceeds
(hashlib releases the GIL on large reads), and a file's hash is remembered, keyed by its
path, size, mtime and inode, as git and make trust them: merging the same inputs again
(a sweep over lam or density) hashes nothing. Files in a Hugging Face cache are named by
their sha256 already (LFS blobs) and are not read at all. ROBUSTMERGE_HASH_CACHE=0 turns
the memory off; ROBUSTMERGE_CACHE_DIR moves it (default ~/.cache/robustmerge_kernels).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._version import __version__
from ..jsonfile import write_json
from .sources import AdapterSource

_CHUNK = 8 << 20
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
CACHE_FILE = "sha256-v1.json"
_CACHE_LIMIT = 20_000  # entries kept (the newest), a few MB at most


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache_path() -> str | None:
    """The merge record's hash memory: $ROBUSTMERGE_CACHE_DIR (or ~/.cache/robustmerge_kernels)
    /sha256-v1.json; None with ROBUSTMERGE_HASH_CACHE=0."""
    if os.environ.get("ROBUSTMERGE_HASH_CACHE", "1").strip() == "0":
        return None
    folder = os.environ.get("ROBUSTMERGE_CACHE_DIR") or os.path.expanduser("~/.cache/robustmerge_kernels")
    return os.path.join(folder, CACHE_FILE)


_DEFAULT = object()


class HashCache:
    """sha256 of files already hashed, keyed by (real path, size, mtime_ns, inode), kept in
    the JSON file ``path`` (default: :func:`default_cache_path`; None: remember nothing)."""

    def __init__(self, path: Any = _DEFAULT):
        self.path = default_cache_path() if path is _DEFAULT else path
        self._entries: dict[str, str] = {}
        self._new = False
        self._lock = threading.Lock()
        if self.path is not None:
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
                self._entries = {k: v for k, v in data.items() if isinstance(v, str) and _SHA256_NAME.match(v)}
            except (OSError, ValueError, AttributeError):
                self._entries = {}  # absent or unreadable: start afresh, never fail a merge

    def sha256(self, path: str) -> str:
        real = os.path.realpath(path)
        name = os.path.basename(real)
        if os.path.basename(os.path.dirname(real)) == "blobs" and _SHA256_NAME.match(name):
            return name  # a Hugging Face cache blob is named by its content's sha256
        st = os.stat(real)
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            return hit
        digest = file_sha256(real)
        with self._lock:
            self._entries[key] = digest
            self._new = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._new:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            entries = dict(list(self._entries.items())[-_CACHE_LIMIT:])
            write_json(self.path, entries, indent=None)
        except OSError:
            pass  # a read-only home or a full disk costs only the next merge's time


class InputHashes:
    """sha256 of the files of the inputs ``which`` (default: all; a distributed rank hashes
    its share), computed in the background: ``result()`` maps input index to its files."""

    def __init__(self, sources: list[AdapterSource], which: list[int] | None = None):
        self._cache = HashCache()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustmerge-sha256")
        self._futures: dict[int, dict[str, Future]] = {
            t: {os.path.basename(p): self._pool.submit(self._cache.sha256, p) for p in sources[t].files}
            for t in (range(len(sources)) if which is None else which)
        }

    def result(self) -> dict[int, dict[str, str]]:
        try:
            out = {t: {name: f.result() for name, f in futures.items()} for t, futures in self._futures.items()}
        finally:
            self._pool.shutdown()
        self._cache.save()
        return out

    def cancel(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def build_record(
    sources: list[AdapterSource], hashes: dict[int, dict[str, str]], report: dict[str, Any]
) -> dict[str, Any]:
    """``hashes``: input index -> {file name: sha256} (InputHashes.result())."""
    inputs = []
    for t, source in enumerate(sources):
        files = hashes.get(t, {})
        entry: dict[str, Any] = {"label": source.label}
        if source.folder is not None:
            entry["folder"] = os.path.abspath(source.folder)
            entry["sha256"] = files
        else:
            entry["in_memory"] = True  # a state dict or model: nothing on disk to hash
        if source.hub is not None:  # reproducible from the id and the resolved commit
            entry["hub"] = {"repo_id": source.hub.ref.repo_id, "revision": source.hub.ref.revision,
                            "commit": source.hub.commit, "subfolder": source.hub.ref.subfolder}  # fmt: skip
        inputs.append(entry)
    return {"library": "robustmerge_kernels", "version": __version__, "inputs": inputs, **report}
