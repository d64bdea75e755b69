"""A lazy, validating reader for `.safetensors` files (memory-mapped; bf16 via ml_dtypes; no torch).

Format: 8-byte little-endian header size N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`,
then the raw tensor bytes. Offsets and sizes are checked, so a truncated file fails with its name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile(Mapping):
    """Read-only mapping `name -> np.ndarray` over one safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {len(raw)} bytes)")
            (header_size,) = struct.unpack("<Q", raw)
            if header_size > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: corrupt or truncated safetensors header")
            try:
                header = json.loads(f.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_size
        data_size = size - self._data_start
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype = np.dtype(_DTYPES[entry["dtype"]])
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: bad header entry for tensor {name!r}: {entry}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
                raise ValueError(f"{self.path}: tensor {name!r} offsets do not match its shape {shape}")
            if end > data_size:
                raise ValueError(f"{self.path}: truncated file; tensor {name!r} ends past the end of the data")
            self._entries[name] = (dtype, shape, begin)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if self._entries else None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape))
        start = self._data_start + begin
        raw = self._mmap[start : start + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
