"""The safetensors file format, read and laid out by hand.

We parse headers ourselves (instead of `safe_open`) for three reasons: every problem can be
reported with the file and tensor at fault before any data is read; a tensor can be read with a
single positioned read of exactly its bytes (no mmap of a whole shard); and a writer can lay
out a shard's header from shapes alone, then stream tensors into place as they are computed.

Format: 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}`, padded with spaces to a multiple
of 8), then the data; offsets are relative to the data start.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file

from ..dtypes import ITEMSIZE
from ..errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its shard header describes it; offsets are absolute file positions."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    entries: tuple[HeaderEntry, ...]  # in data-offset order
    metadata: Mapping[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard's header, reading only the header bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (header length {n}, file size {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (tensor {exc.args[0]!r} listed twice)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries: list[HeaderEntry] = []
    for name, desc in header.items():
        try:
            dtype, shape_list, offsets = desc["dtype"], desc["shape"], desc["data_offsets"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if not _int_list(shape_list) or not _int_list(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} (shape {shape_list!r}, "
                                  f"data_offsets {offsets!r}: expected lists of non-negative integers)")
        shape = tuple(shape_list)
        begin, end = offsets
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size} bytes"
            )
        entries.append(HeaderEntry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    # As the safetensors library requires: the tensors tile the data exactly, in offset order. An
    # overlap would make two tensors read the same bytes; a gap means the header and data disagree.
    at = data_start
    for e in entries:
        if e.begin != at:
            what = "overlaps the tensor before it" if e.begin < at else f"leaves {e.begin - at} unused bytes before it"
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {e.name!r} {what})")
        at = e.end
    if at != size:  # the safetensors library (hence transformers) refuses such a file too
        raise CheckpointError(f"{path}: corrupt safetensors file ({size - at} bytes after the last tensor's data)")
    return ShardHeader(path, tuple(entries), metadata, data_start, size)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def layout_header(
    tensors: Sequence[PlannedTensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes for a shard holding `tensors` in this order, and each tensor's absolute span."""
    desc: dict[str, object] = {}
    if metadata:
        desc["__metadata__"] = dict(metadata)
    offset = 0
    rel: dict[str, tuple[int, int]] = {}
    for t in tensors:
        desc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        rel[t.name] = (offset, offset + t.nbytes)
        offset += t.nbytes
    body = json.dumps(desc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    head = struct.pack("<Q", len(body)) + body
    spans = {k: (len(head) + a, len(head) + b) for k, (a, b) in rel.items()}
    return head, spans


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """One positioned read straight into `buffer` (no bytes object in between)."""
    return os.preadv(fd, [buffer], offset)


def _pread_copy(fd: int, buffer: memoryview, offset: int) -> int:
    """One positioned read through a bytes object, for systems without preadv (macOS before 11)."""
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


_PREAD = _pread_into if hasattr(os, "preadv") else _pread_copy


def pread_exact(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` from `offset`, looping over short reads."""
    done = 0
    total = len(buffer)
    while done < total:
        n = _PREAD(fd, buffer[done:], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: truncated while reading at byte {offset + done}")
        done += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    total = len(data)
    while done < total:
        done += os.pwrite(fd, data[done:], offset + done)


def write_file(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str] | None = None, *,
               target: Path | None = None) -> None:
    """safetensors' `save_file` for small files (banks, probes, adapters), whose failed writes
    are the OSError they are: safetensors reports a refused or failed write (permissions, a full
    disk) as a SafetensorError carrying Rust's text, which would reach the user as a traceback.
    `target` is the path the user asked for, named in the error when `path` is a temporary."""
    try:
        save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(target or path)) from None
