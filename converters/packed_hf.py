"""Pre-quantized Hugging Face checkpoints: GPTQ and AWQ safetensors, as integer codes or float weights.

A linear `p` stored packed has, instead of `p.weight` [out, in], int32 tensors holding 32 / bits codes
each and float16 scales per group of `group_size` input rows (the formats' documentation, as written by
AutoGPTQ / GPTQModel and AutoAWQ's GEMM kernels):
  GPTQ  p.qweight [in * bits / 32, out]   code of input row k in word k // (32/bits), bits (k % (32/bits)) * bits
        p.qzeros  [groups, out * bits / 32]  zero of column n likewise along n
        p.scales  [groups, out];  p.g_idx [in] (the group of every input row)
        w[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k], where z is the stored zero plus 1 in the
        original format (`checkpoint_format` "gptq"; "gptq_v2" stores z itself).
  AWQ   p.qweight [in, out / 8], p.qzeros [groups, out / 8]: eight 4-bit values per word along `out`, the
        i-th nibble holding column 8 j + (0, 2, 4, 6, 1, 3, 5, 7)[i];  p.scales [groups, out];
        w[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = k // group_size.
`PackedTensors` shows such a checkpoint as a mapping with plain `p.weight` names (dequantized float32 on
read, [out, in] like any Hugging Face weight) plus `codes(name)`: the same weight as `BlockCodes` with
signed codes q - 2^(bits-1) and offsets s (2^(bits-1) - z), exact. GPTQ's act-order checkpoints (g_idx not
k // group_size) have no such layout: they read as float and are re-quantized by `converters.load`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from converters.gguf_codes import BlockCodes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    """What `config.json`'s `quantization_config` says: method "gptq" or "awq", bits, group_size, and
    the amount added to GPTQ's stored zeros (1 in the original format)."""

    method: str
    bits: int
    group_size: int
    zero_shift: int = 0


def packed_format(config: Mapping) -> PackedFormat | None:
    """The packed format of a Hugging Face config dict (None: a float checkpoint); ValueError for one
    this reader does not know."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size"))
    if method not in ("gptq", "awq"):
        raise ValueError(f"quantization_config: quant_method {method!r} is not supported (gptq and awq are)")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"quantization_config: AWQ version {q.get('version')!r} is not supported (only 'gemm')")
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise ValueError(f"quantization_config: {method} with {bits} bits is not supported")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"quantization_config: group_size must be a positive int, got {group!r} (-1: not supported)")
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not supported")
    return PackedFormat(method, bits, group, 1 if method == "gptq" and fmt == "gptq" else 0)


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> their 32 / bits unsigned codes, spread along `axis` (0 or 1), low bits first."""
    per = 32 // bits
    w = np.asarray(words).view(np.uint32)
    shifts = (bits * np.arange(per, dtype=np.uint32)).reshape((1, per, 1) if axis == 0 else (1, 1, per))
    expanded = (w[:, None, :] if axis == 0 else w[:, :, None]) >> shifts
    codes = (expanded & np.uint32(2**bits - 1)).astype(np.int32)
    return codes.reshape(w.shape[0] * per, w.shape[1]) if axis == 0 else codes.reshape(w.shape[0], -1)


class PackedTensors(Mapping):
    """A GPTQ / AWQ checkpoint's tensors (see the module docstring) under plain Hugging Face names."""

    def __init__(self, source: Mapping, fmt: PackedFormat):
        self._source, self._fmt = source, fmt
        prefixes = {n[: -len(".qweight")] for n in source if n.endswith(".qweight")}
        self._packed = {p + ".weight": p for p in prefixes}
        self._hidden = {p + s for p in prefixes for s in _PARTS}

    def _integers(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q [in, out], zeros [groups, out], scales [groups, out] float32, g_idx [in]) of packed `name`."""
        p, fmt = self._packed[name], self._fmt
        for part in (".qweight", ".qzeros", ".scales"):
            if p + part not in self._source:
                raise ValueError(f"packed linear {p!r} has no {part[1:]} tensor")
        scales = np.asarray(self._source[p + ".scales"], np.float32)
        if fmt.method == "awq":
            order = np.argsort(AWQ_ORDER)  # the column position each nibble slot holds, inverted

            def columns(words):
                codes = _unpack(words, 4, axis=1)
                return codes.reshape(codes.shape[0], -1, 8)[:, :, order].reshape(codes.shape[0], -1)

            q, zeros = columns(self._source[p + ".qweight"]), columns(self._source[p + ".qzeros"])
            g_idx = np.arange(q.shape[0]) // fmt.group_size
        else:
            q = _unpack(self._source[p + ".qweight"], fmt.bits, axis=0)
            zeros = _unpack(self._source[p + ".qzeros"], fmt.bits, axis=1) + fmt.zero_shift
            default = np.arange(q.shape[0]) // fmt.group_size
            g_idx = np.asarray(self._source[p + ".g_idx"]) if p + ".g_idx" in self._source else default
        k, n = q.shape
        if scales.shape != zeros.shape or scales.shape[1] != n or g_idx.shape != (k,) or g_idx.max() >= len(scales):
            raise ValueError(
                f"packed linear {p!r}: qweight {q.shape}, qzeros {zeros.shape}, scales {scales.shape} and g_idx "
                f"{g_idx.shape} do not fit together ({fmt.method}, {fmt.bits} bits, group_size {fmt.group_size})"
            )
        return q, zeros, scales, g_idx

    def _contiguous(self, rows: int, groups: int, g_idx: np.ndarray) -> bool:
        """Whether input row i is in group i // group_size (no act-order permutation), `groups` of them."""
        size = self._fmt.group_size
        g_idx = np.asarray(g_idx)
        return groups * size == rows and g_idx.shape == (rows,) and bool((g_idx == np.arange(rows) // size).all())

    def native_bits(self, name: str) -> int | None:
        """Bits of `name`'s codes if `codes(name)` can give them (contiguous groups), else None."""
        if name not in self._packed:
            return None
        p, fmt = self._packed[name], self._fmt
        if any(p + part not in self._source for part in (".qweight", ".qzeros", ".scales")):
            return None  # converting it raises the clear error of `_integers`
        # From shapes and g_idx alone: `codes` unpacks the words once, when the weight is converted.
        rows = len(self._source[p + ".qweight"]) * (32 // fmt.bits if fmt.method == "gptq" else 1)
        g_idx = np.arange(rows) // fmt.group_size
        if fmt.method == "gptq" and p + ".g_idx" in self._source:
            g_idx = self._source[p + ".g_idx"]
        return fmt.bits if self._contiguous(rows, len(self._source[p + ".scales"]), g_idx) else None

    def codes(self, name: str) -> BlockCodes:
        """Packed weight `name` as signed codes with scales and offsets, rows = outputs ([out, in])."""
        q, zeros, scales, g_idx = self._integers(name) if name in self._packed else (None,) * 4
        if q is None or not self._contiguous(q.shape[0], len(scales), g_idx):
            raise ValueError(f"{name!r} has no block layout (not packed, or act-order groups)")
        half = 2 ** (self._fmt.bits - 1)
        codes = np.ascontiguousarray((q - half).astype(np.int8).T)
        offsets = np.ascontiguousarray((scales * (half - zeros)).astype(np.float32).T)
        return BlockCodes(codes, np.ascontiguousarray(scales.T), offsets, self._fmt.group_size, self._fmt.bits)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._packed:
            q, zeros, scales, g_idx = self._integers(name)
            return np.ascontiguousarray((scales[g_idx] * (q - zeros[g_idx])).astype(np.float32).T)
        if name in self._hidden:
            raise KeyError(name)
        return self._source[name]

    def __contains__(self, name) -> bool:
        return name in self._packed or (name not in self._hidden and name in self._source)

    def __iter__(self) -> Iterator[str]:
        yield from (n for n in self._source if n not in self._hidden)
        yield from self._packed

    def __len__(self) -> int:
        return sum(1 for _ in self)
