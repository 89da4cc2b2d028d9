"""Streaming safetensors reader/writer over any binary file object (local file or S3 object).

The model is built on the meta device and every tensor is read straight into its final device and
dtype, one at a time, so loading never holds two copies of the weights. Writing is just as lazy:
the header is computed from shapes and dtypes (a :class:`LazyTensor` says them before it exists) and
each tensor is made and written as it comes, so writing holds about one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
WRITE_CHUNK = 64 * 2**20  # bytes per write call: an object-store upload buffers one call at a time


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its shape and dtype before it exists; ``load()`` makes it (e.g. from shards)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def _corrupt(name: str, problem: str) -> ValueError:
    from irg.model.checkpoint import CheckpointError  # checkpoint.py reads through this module

    return CheckpointError(f"{name}: not a safetensors file ({problem})")


class SafetensorsReader:
    """Random access to the tensors of a safetensors file, by name.

    The header is checked against the file's size before it is read, so a corrupt length or entry is
    a :class:`~irg.model.checkpoint.CheckpointError` naming the file, not a huge allocation.
    """

    def __init__(self, file: IO[bytes], name: str):
        self.file, self.name = file, name
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        raw_len = file.read(8)
        if len(raw_len) != 8:
            raise _corrupt(name, "too short")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise _corrupt(name, f"header length {header_len} exceeds the file's {size} bytes")
        try:
            header = json.loads(file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _corrupt(name, f"bad header: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(name, f"header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + header_len
        for key, entry in header.items():
            self._check_entry(key, entry, size - self.data_start)

    def _check_entry(self, key: str, entry, data_size: int) -> None:
        try:
            dtype, shape, (start, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            valid = all(isinstance(d, int) and d >= 0 for d in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise _corrupt(self.name, f"bad header entry for tensor {key}: {str(entry)[:200]}")
        if end - start != math.prod(shape) * dtype.itemsize or end > data_size:
            raise _corrupt(self.name, f"tensor {key}: data_offsets {[start, end]} do not fit its shape {shape} "
                                      f"and the file's {data_size} data bytes")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        self.file.seek(self.data_start + start)
        data = bytearray(end - start)
        if self.file.readinto(data) != end - start:  # straight into the tensor's buffer: one copy in memory
            raise ValueError(f"{self.name}: tensor {key} is truncated")
        dtype = _DTYPES[entry["dtype"]]
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def write_safetensors(file: IO[bytes], tensors: Mapping[str, torch.Tensor | LazyTensor],
                      dtype: torch.dtype | None = None) -> None:
    """Write named tensors, floating-point ones cast to ``dtype`` if given, one at a time on CPU.

    A :class:`LazyTensor` is loaded only when its turn comes and dropped once written.
    """

    def target_dtype(t: torch.Tensor | LazyTensor) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    header, offset = {}, 0
    for name, t in tensors.items():
        size = math.prod(t.shape) * target_dtype(t).itemsize
        header[name] = {"dtype": _NAMES[target_dtype(t)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align tensor data to 8 bytes
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for name, t in tensors.items():
        _write_tensor(file, name, t, target_dtype(t))


def _write_tensor(file: IO[bytes], name: str, t: torch.Tensor | LazyTensor, dtype: torch.dtype) -> None:
    """One tensor's bytes (its own function, so a loaded tensor is freed before the next one loads)."""
    spec = (tuple(t.shape), t.dtype)
    if isinstance(t, LazyTensor):
        t = t.load()
        if (tuple(t.shape), t.dtype) != spec:
            raise ValueError(f"tensor {name} was announced as {spec} but loaded as {(tuple(t.shape), t.dtype)}")
    data = t.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy()
    for start in range(0, data.size, WRITE_CHUNK):
        file.write(data[start: start + WRITE_CHUNK])
