"""``robustmerge analyze``: what LoRA adapters look like in low-rank space and what a merge keeps.

core.py     :func:`analyze`: open adapters, per-module metrics, :class:`Analysis`
metrics.py  the metrics of one module, exact in the low-rank space (QR + r x r SVD)
summary.py  means per task, merged adapter, layer and module type
report.py   analysis.json, analysis.md
plots.py    spectra.png, interference.png, kept.png

(The package is ``analysis`` so that ``robustmerge_kernels.analyze`` can be the function.)
"""

from .core import Analysis, analyze

__all__ = ["Analysis", "analyze"]
