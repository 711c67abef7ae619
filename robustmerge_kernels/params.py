"""RobustMerge hyper-parameters (docs/ALGORITHM.md §2), validated once at the API boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AdapterError


@dataclass(frozen=True)
class RobustMergeParams:
    density: float = 0.2  # fraction of each matrix kept (official mask_ratio)
    clamp_quantile: float = 0.8  # per-task lower clamp of the A-row scales (1 - att_ratio)
    lam: float = 2.0  # fusion weight, applied to merged A and merged B

    def __post_init__(self):
        for name in ("density", "clamp_quantile", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdapterError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < self.density <= 1.0:
            raise AdapterError(f"density must be in (0, 1], got {self.density!r}")
        if not 0.0 <= self.clamp_quantile <= 1.0:
            raise AdapterError(f"clamp_quantile must be in [0, 1], got {self.clamp_quantile!r}")
