"""One error type for bad input, so callers can catch it and users read *where* it is.

Every message names the adapter (its path or list index), the tensor (its key) when there
is one, and the reason. Nothing in this library raises a bare ValueError on user input.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Raised for an input adapter (or merge option) that cannot be merged correctly."""

    def __init__(self, reason: str, adapter: str | None = None, tensor: str | None = None):
        self.adapter = adapter
        self.tensor = tensor
        self.reason = reason
        where = []
        if adapter is not None:
            where.append(f"adapter {adapter}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
