"""One way to write a JSON file that is complete on disk when the call returns."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def write_json(
    path: str,
    data: Any,
    *,
    atomic: bool = True,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write ``data`` as JSON, flushed and fsynced. ``atomic``: into a temporary file beside
    ``path``, renamed over it, so a reader (or a crash) never sees half a file; without it,
    for files inside a folder that is itself renamed into place when complete."""
    target = f"{path}.tmp{os.getpid()}" if atomic else path
    try:
        with open(target, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=False)
            if indent is not None:
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic and os.path.exists(target):
            os.remove(target)  # our own temporary file, never the destination
        raise
