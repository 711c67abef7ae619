"""The safetensors format, read and written without the safetensors library.

Reader (:class:`SafetensorsFile`) and streaming writer (:class:`SafetensorsStream`) share
one dtype table and one way of viewing a tensor's bytes, so what one writes the other
reads. Both use positional I/O (preadv/pwrite) on plain file descriptors: the input's
pages never map into the process and the output is written tensor by tensor, so memory is
bounded by what the merge holds, not by the files' sizes.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from typing import Any

import torch

from ..errors import AdapterError

# safetensors dtype names this library merges (others are refused when planned).
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_OTHER = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20
# The same table the other way round: what the writer names each dtype.
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (for positional reads/writes).
    The view does not own the memory: the caller keeps ``t`` alive while using it."""
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


class SafetensorsFile:
    """A safetensors file read tensor by tensor with positional reads into fresh buffers.

    Reading with preadv instead of memory-mapping keeps the file's pages out of the
    process: peak memory is what the merge holds, not the size of the inputs. The header
    is validated up front (offsets inside the file, sizes matching dtype and shape, no
    duplicate keys), so a truncated or corrupt file is refused before any merging.
    """

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, reason: str, key: str | None = None):
        raise AdapterError(f"corrupt safetensors file {self.path!r}: {reason}", self.label, key)

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            self._fail("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            self._fail(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(f"header is not valid JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self._data = 8 + n
        self.shapes, self.dtypes, self._spans = {}, {}, {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                self._fail("malformed tensor entry", key)
            if name not in ST_DTYPES:
                if name not in _ST_OTHER:
                    self._fail(f"unknown dtype {name!r}", key)
                raise AdapterError(f"dtype {name} is not a floating-point type this library merges", self.label, key)
            if any(d < 0 for d in shape):
                self._fail(f"negative dimension in shape {list(shape)}", key)
            numel = math.prod(shape)
            if not (0 <= start <= end <= size - self._data) or end - start != numel * ST_DTYPES[name].itemsize:
                self._fail(f"data offsets [{start}, {end}) do not fit the file or the shape {list(shape)}", key)
            self.shapes[key], self.dtypes[key], self._spans[key] = shape, ST_DTYPES[name], start

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        view = byte_view(out)
        got, offset = 0, self._data + self._spans[key]
        while got < len(view):  # preadv may return short counts
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                self._fail("file ended inside the tensor's data", key)
            got += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsStream:
    """A safetensors file written tensor by tensor as the merge produces them.

    Every output's name, shape and dtype is known from the plan before merging, so the
    header (with each tensor's offset) is written first and each tensor goes to its place
    with a positional write as soon as it exists. close() checks every tensor arrived.
    """

    def __init__(
        self,
        path: str,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        create: bool = True,
        expect: set[str] | None = None,
    ):
        """``create=False`` joins a file another process created from the same entries (a
        distributed merge: every rank writes its tensors into the one file); ``expect`` is
        the keys this writer must write before close() (default: all)."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._spans: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for key, shape, dtype in entries:
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._spans[key] = (offset, tuple(shape), dtype)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._data = 8 + len(text)
        head = len(text).to_bytes(8, "little") + text
        if create:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, self._data + offset)
        else:
            self._fd = os.open(path, os.O_RDWR)
            if os.fstat(self._fd).st_size != self._data + offset or os.pread(self._fd, len(head), 0) != head:
                os.close(self._fd)
                raise ValueError(f"{path} was not created from the same tensor list; refusing to write into it")
        self._pending = set(self._spans) if expect is None else set(expect)
        if not self._pending <= set(self._spans):
            raise ValueError(f"expected keys not in the file, e.g. {sorted(self._pending - set(self._spans))[0]!r}")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        offset, shape, dtype = self._spans[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, the header says {shape} {dtype}")
        t = tensor.detach().to("cpu").contiguous()  # kept: the view does not own the memory
        view = byte_view(t)
        done = 0
        while done < len(view):  # pwrite may write less than asked
            done += os.pwrite(self._fd, view[done:], self._data + offset + done)
        self._pending.discard(key)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._pending:
                raise RuntimeError(f"{len(self._pending)} tensors never written, e.g. {sorted(self._pending)[0]!r}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
