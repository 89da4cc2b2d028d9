"""Streaming safetensors reader/writer over any binary file object (local file or S3 object).

The model is built on the meta device and every tensor is read straight into its final device and
dtype, one at a time, so loading never holds two copies of the weights. Writing is just as lazy:
the header is computed from shapes and each tensor is written as it comes.
"""

from __future__ import annotations

import json
import struct
from typing import IO

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsReader:
    """Random access to the tensors of a safetensors file, by name."""

    def __init__(self, file: IO[bytes], name: str):
        self.file, self.name = file, name
        raw_len = file.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{name}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw_len)
        try:
            header = json.loads(file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: not a safetensors file (bad header: {e})") from None
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + header_len

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


def write_safetensors(file: IO[bytes], tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Write named tensors, floating-point ones cast to ``dtype`` if given, one at a time on CPU."""

    def target_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * torch.empty((), dtype=target_dtype(t)).element_size()
        header[name] = {"dtype": _NAMES[target_dtype(t)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align tensor data to 8 bytes
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for t in tensors.values():
        t = t.detach().to("cpu", target_dtype(t)).contiguous()
        if t.numel():
            file.write(t.view(torch.uint8).numpy().tobytes())
