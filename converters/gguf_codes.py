"""The integer codes of GGUF block-quantized tensors, as `QuantizedWeight`s, without a float32 model.

ggml stores a weight [out, in] row by row in blocks along `in`; every block format below is, per group of
`group` consecutive inputs, `w = q * scale + offset` with small integer codes q:
  Q8_0  blocks of 32: f16 d, 32 x int8 q                      scale d,            q in [-127, 127]
  Q4_0  blocks of 32: f16 d, 16 bytes of nibbles n            scale d,            q = n - 8
  Q4_1  blocks of 32: f16 d, f16 m, nibbles n                 scale d,            q = n - 8, offset m + 8 d
  Q4_K  super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-scales sc and sub-mins mn, nibbles n;
        8 groups of 32:                                       scale d sc,         q = n - 8, offset 8 d sc - dmin mn
  Q6_K  super-blocks of 256: 6-bit codes, 16 int8 sub-scales sc, f16 d (last); 16 groups of 16:
                                                              scale d sc,         q in [-32, 31]
The scales (and offsets) are read from the block bytes; the codes are recovered from the `gguf` package's
own dequantized values as round((w - offset) / scale), and checked: the codes must be integers in range and
rebuild w to float32 rounding, or ValueError. Codes in [-8, 7] fit 4-bit `QuantizedWeight`s; every format
fits 8-bit ones. A layer's weights may come in different formats (Q4_K_M files mix Q4_K and Q6_K): `stack`
re-blocks them to the smallest group size of the stack (repeating scales), so one stacked array holds all.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pallas_kernels.quantized_matmul import QuantizedWeight, pack_int4
from pallas_kernels.quantized_matmul import quantize_weights as quantize_matrix

# GGUF type name -> (group size, bits its codes need)
NATIVE = {"Q8_0": (32, 8), "Q4_0": (32, 4), "Q4_1": (32, 4), "Q4_K": (32, 4), "Q6_K": (16, 8)}


@dataclasses.dataclass(frozen=True)
class BlockCodes:
    """One GGUF tensor [rows, cols] as codes int8 [rows, cols], scales / offsets (or None) float32
    [rows, cols / group]; `bits`: 4 if every code is in [-8, 7], else 8."""

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    group: int
    bits: int

    def take_rows(self, transform) -> BlockCodes:
        """The same weight with `transform` (a row permutation such as the rotary un-permutation) applied
        to the rows of codes, scales and offsets alike."""
        offsets = None if self.offsets is None else transform(self.offsets)
        return dataclasses.replace(self, codes=transform(self.codes), scales=transform(self.scales), offsets=offsets)


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, start : start + 2]).view(np.float16).astype(np.float32)[:, 0]


def _group_params(type_name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per block of bytes `raw: [blocks, type_size]` -> (scales [blocks, groups per block], and for the
    unsigned formats the offsets of their stored codes n, w = n * scale + offset; else None)."""
    if type_name in ("Q8_0", "Q4_0"):
        return _f16(raw, 0)[:, None], None
    if type_name == "Q4_1":
        return _f16(raw, 0)[:, None], _f16(raw, 2)[:, None]
    if type_name == "Q4_K":
        from gguf.quants import Q4_K

        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(raw[:, 4:16]))
        return _f16(raw, 0)[:, None] * sc.astype(np.float32), -_f16(raw, 2)[:, None] * mn.astype(np.float32)
    if type_name == "Q6_K":
        sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)
        return _f16(raw, 208)[:, None] * sc, None
    raise ValueError(f"no integer layout for GGUF type {type_name}")


def block_codes(tensor) -> BlockCodes:
    """The codes of a `gguf.ReaderTensor` of a type in `NATIVE` (see the module docstring)."""
    import gguf
    from gguf.quants import dequantize

    name = tensor.tensor_type.name
    if name not in NATIVE:
        raise ValueError(f"GGUF tensor {tensor.name!r} is {name}; integer layouts exist for {', '.join(NATIVE)}")
    group, _ = NATIVE[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    cols = int(tensor.shape[0])
    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(-1, cols)
    rows = w.shape[0]
    raw = np.asarray(tensor.data).view(np.uint8).reshape(-1, type_size)
    scales, offsets = _group_params(name, raw)
    scales = scales.reshape(rows, cols // group)
    offsets = None if offsets is None else offsets.reshape(rows, cols // group)
    wg = w.reshape(rows, cols // group, group)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = np.rint((wg - (0.0 if offsets is None else offsets[..., None])) / safe)
    q = np.where(scales[..., None] == 0, 0.0, q)
    if offsets is not None:  # unsigned nibbles 0..15 -> signed codes -8..7, the offset absorbing 8 steps
        q = q - 8
        offsets = offsets + 8 * scales
    shift = 0.0 if offsets is None else offsets[..., None]
    rebuilt = q * scales[..., None] + shift
    tolerance = 8 * np.finfo(np.float32).eps * (np.abs(wg) + np.abs(q * scales[..., None]) + np.abs(shift)) + 1e-30
    if np.abs(q).max(initial=0) > 127 or not (np.abs(rebuilt - wg) <= tolerance).all():
        raise ValueError(f"GGUF tensor {tensor.name!r} ({name}): its blocks do not decode to integer codes")
    bits = 4 if q.min(initial=0) >= -8 and q.max(initial=0) <= 7 else 8
    return BlockCodes(q.reshape(rows, cols).astype(np.int8), scales, offsets, group, bits)


def as_quantized(codes: BlockCodes, bits: int) -> QuantizedWeight:
    """Codes of a weight stored [out, in] -> `QuantizedWeight` of our [in, out] layout with `bits` bits
    (4 needs codes in [-8, 7])."""
    if bits < codes.bits:
        raise ValueError(f"these codes need {codes.bits} bits, asked for {bits}")
    values = codes.codes.T
    values = values if bits == 8 else np.asarray(pack_int4(values))
    offsets = None if codes.offsets is None else np.ascontiguousarray(codes.offsets.T)
    return QuantizedWeight(
        np.ascontiguousarray(values), np.ascontiguousarray(codes.scales.T), bits, codes.group, offsets
    )


def requantized(w_out_in: np.ndarray, bits: int, group_size: int | None) -> QuantizedWeight:
    """A float weight stored [out, in] rounded to nearest in our layout (group None: per output channel)."""
    w = np.ascontiguousarray(w_out_in.T)
    qw = quantize_matrix(w, bits=bits, group_size=w.shape[0] if group_size is None else group_size)
    return QuantizedWeight(np.asarray(qw.values), np.asarray(qw.scales), qw.bits, qw.group_size)


def _reblock(qw: QuantizedWeight, group: int, with_offsets: bool) -> QuantizedWeight:
    """The same weight with smaller groups of `group` rows (each scale repeated), offsets zero if absent."""
    factor = qw.group_size // group
    scales = np.repeat(np.asarray(qw.scales), factor, axis=0)
    offsets = qw.offsets
    if with_offsets:
        offsets = np.zeros_like(scales) if offsets is None else np.repeat(np.asarray(offsets), factor, axis=0)
    return QuantizedWeight(qw.values, scales, qw.bits, group, offsets)


def stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Per-layer weights of one name, all of the same bits and shape -> one stacked `QuantizedWeight`
    ([L, ...] leaves) in the smallest group size among them (see the module docstring)."""
    group = math.gcd(*(w.group_size for w in weights))
    with_offsets = any(w.offsets is not None for w in weights)
    parts = [_reblock(w, group, with_offsets) for w in weights]
    offsets = np.stack([p.offsets for p in parts]) if with_offsets else None
    return QuantizedWeight(
        np.stack([p.values for p in parts]), np.stack([p.scales for p in parts]), parts[0].bits, group, offsets
    )
