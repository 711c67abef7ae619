"""The Triton backend: backend.py drives the kernels of select.py, scales.py and fuse.py
(common.py: what they share). Nothing here imports triton until the backend is created,
so the registry can list it where triton is absent."""

import os


def interpreter_mode() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1; read by
    triton when it is first imported, so it must be set before that)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
