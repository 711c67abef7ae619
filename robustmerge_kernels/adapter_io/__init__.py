"""Adapters in and out: PEFT folders, state dicts and models read as AdapterSources, and
merged adapters written as PEFT folders, atomically.

keys.py            what each key of a LoRA state dict is; the one table of LLaVA layouts
scaling.py         each (adapter, module)'s LoRA scaling, as PEFT computes it
sources.py         user inputs -> AdapterSource (lazy, header-only until read)
safetensors_io.py  the safetensors format: positional reader, streaming writer, dtype table
writer.py          StagedAdapter: a hidden folder renamed into place when complete
destination.py     which outputs may be written or replaced; no-replace/exchange commit, recovery
files.py           opening input files: regular files inside the adapter folder, never blocking
record.py          robustmerge.json: inputs with sha256, method, hyper-parameters
model_config.py    config.json (LLaVA's model config) carried from the inputs to the output
names.py           the file names of an adapter folder
"""

from .names import BIN_NAME, CONFIG_NAME, INDEX_NAME, NON_LORA_NAME, RECORD_NAME, SAFETENSORS_NAME
from .sources import AdapterSource, open_adapter

__all__ = [
    "BIN_NAME", "CONFIG_NAME", "INDEX_NAME", "NON_LORA_NAME", "RECORD_NAME", "SAFETENSORS_NAME",
    "AdapterSource", "open_adapter",
]  # fmt: skip
