"""Evaluate LLaVA base models, adapters and merged adapters on MM-MergeBench.

``robustmerge eval`` (:func:`.runner.evaluate`) and ``robustmerge eval-report``
(:func:`.report.write_report`). Modules: ``tasks`` (registry, data in ``tasks.json``),
``prompts`` (conversation template), ``inputs`` (a record's prompt and image, per the
task's official script), ``model`` (loading, LLaVA layout conversion), ``runner`` (batched
greedy generation, resumable JSONL), ``settings`` (what answers depend on: the resume
key), ``shards`` (data-parallel splitting), ``scoring`` (a task's scorer inputs, samples
log), ``scorers``, ``report``.
"""

from .report import write_report
from .runner import evaluate
from .tasks import load_registry

__all__ = ["evaluate", "load_registry", "write_report"]
