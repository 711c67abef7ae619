"""The Triton backend: backend.py drives the kernels of select.py, scales.py and fuse.py
(common.py: what they share). Nothing here imports triton until the backend is created,
so the registry can list it where triton is absent."""
