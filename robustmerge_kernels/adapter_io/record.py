"""The merge record written beside a merged adapter (robustmerge.json).

It names every input with the sha256 of its weight files, the method, hyper-parameters,
backend and library version, so a merged adapter can be traced and reproduced. Hashing
the inputs costs about as long as merging them, so it runs on a background thread while
the merge proceeds (hashlib releases the GIL on large reads).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._version import __version__
from .sources import AdapterSource

_CHUNK = 8 << 20


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class InputHashes:
    """sha256 of each file-backed input's files, computed in the background."""

    def __init__(self, sources: list[AdapterSource]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustmerge-sha256")
        self._futures: list[dict[str, Future]] = [
            {os.path.basename(p): self._pool.submit(file_sha256, p) for p in s.files} for s in sources
        ]

    def result(self) -> list[dict[str, str]]:
        try:
            return [{name: f.result() for name, f in futures.items()} for futures in self._futures]
        finally:
            self._pool.shutdown()

    def cancel(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def build_record(sources: list[AdapterSource], hashes: list[dict[str, str]], report: dict[str, Any]) -> dict[str, Any]:
    inputs = []
    for source, files in zip(sources, hashes):
        entry: dict[str, Any] = {"label": source.label}
        if source.folder is not None:
            entry["folder"] = os.path.abspath(source.folder)
            entry["sha256"] = files
        if source.hub is not None:  # reproducible from the id and the resolved commit
            entry["hub"] = {"repo_id": source.hub.ref.repo_id, "revision": source.hub.ref.revision,
                            "commit": source.hub.commit, "subfolder": source.hub.ref.subfolder}  # fmt: skip
        else:
            entry["in_memory"] = True  # a state dict or model: nothing on disk to hash
        inputs.append(entry)
    return {"library": "robustmerge_kernels", "version": __version__, "inputs": inputs, **report}
