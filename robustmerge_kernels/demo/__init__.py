"""What the library shows and measures itself with, offline: no hub, no datasets.

offline.py    ``robustmerge demo``: train toy adapters with peft, merge, reload, compare
toy.py        a tiny Llama built from a config and toy next-token tasks to train it on
scoring.py    next-token accuracy, a base model with an adapter's delta applied, training helpers
compare.py    ``robustmerge demo --compare``: every merge method scored and analysed (+ compare_plot.py)
synthetic.py  adapters of real models' shapes (llava-7b, clip) with the paper's statistics,
              for benchmarks
"""

from .offline import max_delta_error, run_demo

__all__ = ["max_delta_error", "run_demo"]
