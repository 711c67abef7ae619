"""The plain-PyTorch backend: runs :mod:`robustmerge_kernels.reference` module by module."""

from __future__ import annotations

import torch

from ..params import RobustMergeParams
from ..reference import robustmerge_module
from . import ModuleInputs


class ReferenceBackend:
    name = "reference"
    checks_finite = False  # the API scans inputs for inf/NaN before calling it

    def robustmerge(
        self, group: list[ModuleInputs], params: RobustMergeParams
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for item in group:
            res = robustmerge_module(item.a, item.b, params, item.plan.b_scale, item.plan.out_dtype)
            out.append((res.a, res.b))
        return out
