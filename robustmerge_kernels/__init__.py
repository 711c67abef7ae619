"""robustmerge_kernels: merge many LoRA adapters into one with RobustMerge, fast and exactly."""

from ._version import __version__
from .analysis import Analysis, analyze
from .api import MergedAdapter, MergeReport, merge
from .backends import available_backends, get_backend, register_backend
from .errors import AdapterError
from .params import RobustMergeParams
from .peft_model import add_merged_adapter

__all__ = [
    "AdapterError",
    "Analysis",
    "MergeReport",
    "MergedAdapter",
    "RobustMergeParams",
    "__version__",
    "add_merged_adapter",
    "analyze",
    "available_backends",
    "get_backend",
    "merge",
    "register_backend",
]
