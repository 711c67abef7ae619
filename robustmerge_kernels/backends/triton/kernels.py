"""The Triton kernels of the ``triton`` backend (backend.py), imported together.

Importing this package imports triton; set ``TRITON_INTERPRET=1`` before the first triton
import to run the kernels on the CPU (slow; for tests on small shapes).

Phases, each one launch over every (module, adapter) of a plan group:
  select.py  exact thresholds by histogram radix select (2 passes for 16-bit keys, 3 or 4
             for float32 depending on the digit width), with the inf/NaN check;
  fuse.py    the fused normalised sum across adapters, stored in the output dtype (A*
             first, with the row sums of |A| and kept |A|, then B*);
  scales.py  A-row scales from those row sums, per-task clamp, normalised fusion weights.
"""

from .fuse import fuse_kernel
from .scales import weights_kernel
from .select import digit_bits, hist_kernel, passes

__all__ = ["digit_bits", "fuse_kernel", "hist_kernel", "passes", "weights_kernel"]
