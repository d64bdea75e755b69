"""A lazy, validating reader for `.safetensors` files (memory-mapped; bf16 via ml_dtypes; no torch).

Format: 8-byte little-endian header size N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`,
then the raw tensor bytes. The header is checked as the official `safetensors` reader checks it: sorted
by offset, the tensors must tile the data exactly (each begins where the previous one ends, no overlap,
no gap, nothing after the last) and each span must equal its shape times its dtype's size. So a
truncated or crafted file fails with its name and the tensor's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a name given twice is an error (json.loads would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"name {key!r} appears twice in the header")
        seen.add(key)
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path, f, size: int) -> tuple[dict, int]:
    """The header's tensor entries (without `__metadata__`) and the size of the header in bytes."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    (header_size,) = struct.unpack("<Q", raw)
    if header_size > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: corrupt or truncated safetensors header")
    try:
        header = json.loads(f.read(header_size), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: safetensors __metadata__ must map names to strings, got {metadata!r}")
    return header, header_size


def _entry(path: Path, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field type-checked."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: bad header entry for tensor {name!r}: {entry!r}, expected an object")
    if entry.get("dtype") not in _DTYPES:
        raise ValueError(
            f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}; supported: {', '.join(_DTYPES)}"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}, expected a list of ints >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, expected [begin, end], ints >= 0")
    return np.dtype(_DTYPES[entry["dtype"]]), tuple(shape), offsets[0], offsets[1]


def _check_tiling(path: Path, entries: dict[str, tuple], data_size: int) -> None:
    """The tensors, sorted by offset, must cover [0, data_size) exactly once."""
    position = 0
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position or end < begin:
            raise ValueError(
                f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], expected it to begin at "
                f"{position} where the previous tensor ends (tensors may not overlap or leave gaps)"
            )
        if end - begin != dtype.itemsize * math.prod(shape):
            raise ValueError(f"{path}: tensor {name!r} offsets do not match its shape {shape}")
        if end > data_size:
            raise ValueError(f"{path}: truncated file; tensor {name!r} ends past the end of the data")
        position = end
    if position != data_size:
        raise ValueError(f"{path}: {data_size - position} bytes after the last tensor that no header entry covers")


class SafetensorsFile(Mapping):
    """Read-only mapping `name -> np.ndarray` over one safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header, header_size = _read_header(self.path, f, size)
        self._data_start = 8 + header_size
        entries = {name: _entry(self.path, name, entry) for name, entry in header.items()}
        _check_tiling(self.path, entries, size - self._data_start)
        self._entries = {name: (dtype, shape, begin) for name, (dtype, shape, begin, _) in entries.items()}
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if self._entries else None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = math.prod(shape)
        start = self._data_start + begin
        raw = self._mmap[start : start + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
