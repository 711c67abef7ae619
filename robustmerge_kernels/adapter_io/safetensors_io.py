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
from .files import open_regular

# safetensors dtype names this library merges (others are refused when planned).
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_OTHER = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20  # as the safetensors library
# Tensors per file. Real adapters hold far fewer: a 70B LoRA on all linear layers has
# 80 layers x 7 modules x 2 factors = 1,120, large multimodal ones a few thousand. 100,000
# (90x that) still plans in well under a second, while a hostile 1.3 M-entry header took
# minutes and gigabytes of planning memory.
MAX_TENSORS = 100_000
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


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """A safetensors file read tensor by tensor with positional reads into fresh buffers.

    Reading with preadv instead of memory-mapping keeps the file's pages out of the
    process: peak memory is what the merge holds, not the size of the inputs. The header
    is validated up front as the format requires (offsets covering the data section
    exactly, in order, without gaps or overlaps; sizes matching dtype and shape; integer
    shapes; no duplicate keys; at most MAX_TENSORS), so a truncated, corrupt or hostile
    file is refused before any merging. No descriptor is held between reads (thousands of
    adapters would exhaust the process's limit): each read reopens the file, and a file
    replaced since its header was read is refused.
    """

    def __init__(self, path: str, label: str, folder: str | None = None):
        self.path, self.label, self.folder = path, label, folder
        fd = open_regular(path, label, folder)
        try:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self._parse_header(fd, st.st_size)
        finally:
            os.close(fd)

    def _fail(self, reason: str, key: str | None = None):
        raise AdapterError(f"corrupt safetensors file {self.path!r}: {reason}", self.label, key)

    def _parse_header(self, fd: int, size: int) -> None:
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            self._fail("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            self._fail(f"header length {n} is over the format's {_MAX_HEADER >> 20} MiB limit")
        if n > size - 8:
            self._fail(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(os.pread(fd, n, 8), object_pairs_hook=_no_duplicates)
        except RecursionError:
            self._fail("header is nested too deeply")
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(f"header is not valid JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        count = len(header) - ("__metadata__" in header)
        if count > MAX_TENSORS:
            self._fail(f"header lists {count} tensors, over the limit of "
                       f"{MAX_TENSORS} (real adapters have a few thousand)")  # fmt: skip
        self._data = 8 + n
        self.shapes, self.dtypes, self._spans = {}, {}, {}
        spans = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                self._fail("malformed tensor entry (needs dtype, shape and data_offsets)", key)
            name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(shape, list) or not all(_int(d) for d in shape):
                self._fail(f"shape {shape!r} is not a list of integers", key)
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets):
                self._fail(f"data_offsets {offsets!r} is not a pair of integers", key)
            if not isinstance(name, str) or (name not in ST_DTYPES and name not in _ST_OTHER):
                self._fail(f"unknown dtype {name!r}", key)
            if name not in ST_DTYPES:
                raise AdapterError(f"dtype {name} is not a floating-point type this library merges", self.label, key)
            if any(d < 0 for d in shape):
                self._fail(f"negative dimension in shape {shape}", key)
            start, end = offsets
            numel = math.prod(shape)
            if not (0 <= start <= end <= size - self._data) or end - start != numel * ST_DTYPES[name].itemsize:
                self._fail(f"data offsets [{start}, {end}) do not fit the file or the shape {shape}", key)
            self.shapes[key], self.dtypes[key], self._spans[key] = tuple(shape), ST_DTYPES[name], start
            spans.append((start, end, key))
        # The data section must be covered exactly: each tensor starts where the previous
        # ended. Overlaps would let a small file stand for unbounded output.
        at = 0
        for start, end, key in sorted(spans):
            if start != at:
                what = "overlaps the previous tensor" if start < at else f"leaves a gap of {start - at} bytes"
                self._fail(f"data offsets [{start}, {end}) {what}", key)
            at = end
        if at != size - self._data:
            self._fail(f"{size - self._data - at} bytes after the last tensor's data")

    def read(self, key: str) -> torch.Tensor:
        return self._read_into(key, torch.empty(self.shapes[key], dtype=self.dtypes[key]), 0)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension), read alone: averaging
        a large tensor over many adapters then holds a chunk, not the tensor, per adapter."""
        shape = self.shapes[key]
        start, stop = max(0, min(start, shape[0])), max(0, min(stop, shape[0]))
        out = torch.empty((max(0, stop - start), *shape[1:]), dtype=self.dtypes[key])
        return self._read_into(key, out, start * math.prod(shape[1:]) * self.dtypes[key].itemsize)

    def _read_into(self, key: str, out: torch.Tensor, skip: int) -> torch.Tensor:
        view = byte_view(out)
        got, offset = 0, self._data + self._spans[key] + skip
        if not len(view):
            return out
        fd = open_regular(self.path, self.label, self.folder)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                self._fail("the file changed while merging", key)
            while got < len(view):  # preadv may return short counts
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    self._fail("file ended inside the tensor's data", key)
                got += n
        finally:
            os.close(fd)
        return out

    def close(self) -> None:
        pass  # nothing is held open between reads


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
