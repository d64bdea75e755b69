"""The quantized weight format that every quantized matmul decodes: `QuantizedWeight` (2- to 8-bit codes), int4 and
bit-plane packing, per-group quantization (absmax or min-max), and the input checks the kernels share."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from types import MappingProxyType

import jax
import jax.numpy as jnp

# bits -> (q_min, q_max) of the stored integer codes (read-only: the one source of truth, also for
# the quantizers of `ssm_llm.quant`): two's-complement ranges below 8 bits, symmetric +-127 at 8.
CODE_RANGE = MappingProxyType({8: (-127, 127), **{b: (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in range(2, 8)}})
# Widths the Pallas kernels decode on chip (int8 bytes, nibble pairs); the others run through the reference.
KERNEL_BITS = (4, 8)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scales", "offsets"],
    meta_fields=["bits", "group_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight w [K, N]; `bits` and `group_size` are static pytree metadata (not leaves).

    values: int8 [K, N] (8 bits), uint8 [K / 2, N] (4 bits, two values per byte along K), or for the other
      widths b in 2..7 uint8 bit planes [K * b / 8, N] (`pack_bit_planes`: each 8 rows of K take b bytes);
    scales: [K / group_size, N], float32 or a 16-bit float;
    offsets: None (symmetric: w = q * scale) or [K / group_size, N], float32 or 16-bit (asymmetric formats such
    as GGUF's Q4_1 / Q4_K, or min-max rounding: w = q * scale + offset).
    """

    values: jax.Array
    scales: jax.Array
    bits: int
    group_size: int
    offsets: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the unquantized weight."""
        rows, n = self.values.shape
        return unpacked_rows(self.bits, rows), n


def stored_rows(bits: int, k: int) -> int:
    """Rows of `values` that hold K = k rows of `bits`-bit codes."""
    return k if bits == 8 else k // 2 if bits == 4 else k * bits // 8


def unpacked_rows(bits: int, rows: int) -> int:
    """The inverse of `stored_rows`: K from the stored rows."""
    return rows if bits == 8 else rows * 2 if bits == 4 else rows * 8 // bits


# Its public home, where pickles look it up (the package re-exports it).
QuantizedWeight.__module__ = "pallas_kernels.quantized_matmul"


def check_layout(bits, group_size, k: int, where: str):
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in CODE_RANGE:
        raise ValueError(f"{where}: bits must be an int in 2..8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"{where}: 4-bit weights pack two rows per byte, so K must be even, got K={k}")
    if bits not in (4, 8) and k % 8:
        raise ValueError(
            f"{where}: {bits}-bit weights pack 8 rows into {bits} bytes, so K must be a multiple of 8, got K={k}"
        )
    if k % group_size:
        raise ValueError(f"{where}: K ({k}) must be a multiple of group_size ({group_size})")


def check_weight(qw: QuantizedWeight, where: str):
    if qw.bits in CODE_RANGE and qw.bits not in (4, 8) and qw.values.shape[0] % qw.bits:
        raise ValueError(
            f"{where}: {qw.bits}-bit values need a multiple of {qw.bits} stored rows, got {qw.values.shape[0]}"
        )
    k, n = qw.shape
    check_layout(qw.bits, qw.group_size, k, where)
    values_dtype = jnp.int8 if qw.bits == 8 else jnp.uint8
    if qw.values.dtype != values_dtype:
        raise ValueError(f"{where}: {qw.bits}-bit values must be {jnp.dtype(values_dtype).name}, got {qw.values.dtype}")
    if tuple(qw.scales.shape) != (k // qw.group_size, n):
        raise ValueError(f"{where}: scales must have shape {(k // qw.group_size, n)}, got {tuple(qw.scales.shape)}")
    if qw.offsets is not None and tuple(qw.offsets.shape) != (k // qw.group_size, n):
        raise ValueError(
            f"{where}: offsets must be None or of shape {(k // qw.group_size, n)}, got {tuple(qw.offsets.shape)}"
        )


def check_symmetric(qw: QuantizedWeight, where: str):
    """The kernels multiply symmetric weights only (the dispatchers add the offsets' share)."""
    if qw.offsets is not None:
        raise ValueError(
            f"{where}: this kernel takes symmetric weights (offsets None); call the dispatcher "
            "(quantized_matmul / quantized_matmul_int8), which adds the offsets' share"
        )


def check_kernel_bits(qw: QuantizedWeight, where: str):
    """The Pallas kernels decode 4- and 8-bit codes; other widths go through the reference (impl='xla')."""
    if qw.bits not in KERNEL_BITS:
        raise ValueError(f"{where}: the Pallas kernels take 4- or 8-bit weights, got {qw.bits} bits; use impl='xla'")


def _check_rows(x, name: str, qw: QuantizedWeight, where: str):
    k = qw.shape[0]
    if x.shape[-1:] != (k,):
        raise ValueError(f"{where}: {name} must have shape [..., {k}] (the weight's K), got {tuple(x.shape)}")


def check_inputs(x, qw: QuantizedWeight):
    """The weight-only contract (see `quantized_matmul_ref`)."""
    check_weight(qw, "quantized_matmul")
    _check_rows(x, "x", qw, "quantized_matmul")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantized_matmul: x must be floating point, got {x.dtype}")


def check_int8_inputs(xq, x_scale, qw: QuantizedWeight, out_dtype):
    """The integer-activation contract (see `quantized_matmul_int8_ref`); returns x_scale as a float32 scalar."""
    where = "quantized_matmul_int8"
    check_weight(qw, where)
    _check_rows(xq, "xq", qw, where)
    if xq.dtype != jnp.int8:
        raise ValueError(f"{where}: xq must be int8 activation codes, got {xq.dtype}")
    x_scale = jnp.asarray(x_scale)
    if x_scale.shape != () or not jnp.issubdtype(x_scale.dtype, jnp.floating):
        raise ValueError(
            f"{where}: x_scale must be a floating-point scalar (one per-tensor scale), got "
            f"{x_scale.dtype} with shape {tuple(x_scale.shape)}"
        )
    if not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"{where}: out_dtype must be a floating-point dtype, got {jnp.dtype(out_dtype)}")
    return x_scale.astype(jnp.float32)


def pack_int4(q):
    """q: int [K, N] with values in [-8, 7], K even -> uint8 [K / 2, N] (low nibble: even rows)."""
    q = q.astype(jnp.int32)
    return ((q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)).astype(jnp.uint8)


def sign_extend_nibble(nibble):
    """Two's-complement 4-bit values 0..15 (int32) -> -8..7."""
    return (nibble ^ 8) - 8


def unpack_int4(values):
    """uint8 [K / 2, N] -> int32 [K, N]: the inverse of `pack_int4`."""
    v = values.astype(jnp.int32)
    pairs = jnp.stack([sign_extend_nibble(v & 0xF), sign_extend_nibble(v >> 4)], axis=1)
    return pairs.reshape(2 * values.shape[0], values.shape[1])


def pack_bit_planes(q, bits: int):
    """q: int [K, N] in CODE_RANGE[bits], K a multiple of 8 -> uint8 [K * bits / 8, N]: each 8 rows of K
    take `bits` bytes, byte p of them holding bit p of the 8 rows' two's-complement codes (row r at bit r)."""
    k, n = q.shape
    rows = (q.astype(jnp.int32) & ((1 << bits) - 1)).reshape(k // 8, 1, 8, n)
    planes = (rows >> jnp.arange(bits, dtype=jnp.int32)[None, :, None, None]) & 1  # [K / 8, bits, 8, N]
    packed = jnp.sum(planes << jnp.arange(8, dtype=jnp.int32)[None, None, :, None], axis=2)
    return packed.reshape(k // 8 * bits, n).astype(jnp.uint8)


def unpack_bit_planes(values, bits: int):
    """The inverse of `pack_bit_planes`: uint8 [K * bits / 8, N] -> int32 [K, N]."""
    stored, n = values.shape
    v = values.astype(jnp.int32).reshape(stored // bits, bits, 1, n)
    bit = (v >> jnp.arange(8, dtype=jnp.int32)[None, None, :, None]) & 1  # [K / 8, bits, 8, N]
    codes = jnp.sum(bit << jnp.arange(bits, dtype=jnp.int32)[None, :, None, None], axis=1)
    sign = 1 << (bits - 1)
    return ((codes ^ sign) - sign).reshape(stored // bits * 8, n)


def pack_codes(q, bits: int):
    """Integer codes q [K, N] in CODE_RANGE[bits] -> the `values` array of a `bits`-bit QuantizedWeight."""
    return q.astype(jnp.int8) if bits == 8 else pack_int4(q) if bits == 4 else pack_bit_planes(q, bits)


def group_grid(groups, bits: int, symmetric: bool, scale_dtype):
    """groups float32 [..., g, N] -> (scales, offsets) [..., N] in `scale_dtype`, the grid of each group's g rows:
    absmax / q_max and no offsets (None), or min-max: (max - min) / (q_max - q_min) and min - q_min * scale
    (the scale as stored)."""
    q_min, q_max = CODE_RANGE[bits]
    if symmetric:
        return (jnp.max(jnp.abs(groups), axis=-2) / q_max).astype(scale_dtype), None
    low, high = jnp.min(groups, axis=-2), jnp.max(groups, axis=-2)
    scales = ((high - low) / (q_max - q_min)).astype(scale_dtype)
    return scales, (low - q_min * scales.astype(jnp.float32)).astype(scale_dtype)


def quantize_weights(
    w, bits: int = 8, group_size: int = 128, scale_dtype=jnp.float32, symmetric: bool = True
) -> QuantizedWeight:
    """w: [K, N] float -> `QuantizedWeight` with per-group scales in `scale_dtype`, `bits` in 2..8.

    symmetric: scale = absmax / q_max and no offsets; else min-max over the group's full code range
    (scale = (max - min) / (q_max - q_min), offsets = min - q_min * scale, also in `scale_dtype`), the better
    choice at 2-3 bits. q is rounded against the stored (possibly 16-bit) scale and offset, so |w -
    dequantized| <= scale / 2 inside the range.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weights: w must be 2-D [K, N], got shape {tuple(w.shape)}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"quantize_weights: symmetric must be True or False, got {symmetric!r}")
    k, n = w.shape
    check_layout(bits, group_size, k, "quantize_weights")
    q_min, q_max = CODE_RANGE[bits]
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    scales, offsets = group_grid(groups, bits, symmetric, scale_dtype)
    shifted = groups if offsets is None else groups - offsets.astype(jnp.float32)[:, None, :]
    s32 = scales.astype(jnp.float32)[:, None, :]
    # An all-zero (symmetric) or constant (min-max) group has scale 0: divide by 1 instead, its q are 0 or
    # q_min either way.
    q = jnp.clip(jnp.round(shifted / jnp.where(s32 > 0, s32, 1.0)), q_min, q_max).reshape(k, n)
    return QuantizedWeight(pack_codes(q, bits), scales, bits, group_size, offsets)


def int_values(qw: QuantizedWeight):
    """The quantized values q of `qw` as int32 [K, N]."""
    if qw.bits == 8:
        return qw.values.astype(jnp.int32)
    return unpack_int4(qw.values) if qw.bits == 4 else unpack_bit_planes(qw.values, qw.bits)


def dequantize_weights(qw: QuantizedWeight):
    """QuantizedWeight -> float32 [K, N]."""
    k, n = qw.shape
    groups = (
        int_values(qw).astype(jnp.float32).reshape(-1, qw.group_size, n) * qw.scales.astype(jnp.float32)[:, None, :]
    )
    if qw.offsets is not None:
        groups = groups + qw.offsets.astype(jnp.float32)[:, None, :]
    return groups.reshape(k, n)


def symmetric_part(qw: QuantizedWeight) -> QuantizedWeight:
    """`qw` without its offsets (what the kernels multiply; `offset_term` adds the rest)."""
    return dataclasses.replace(qw, offsets=None)


def offset_term(x, qw: QuantizedWeight):
    """x [..., K] (float, or int8 codes to be scaled by the caller) -> sum over groups g of
    (sum of x's group-g entries) * offsets_g: [..., N] float32 — the offsets' share of x @ w."""
    k, n = qw.shape
    sums = jnp.sum(x.astype(jnp.float32).reshape(*x.shape[:-1], k // qw.group_size, qw.group_size), axis=-1)
    return jnp.matmul(sums, qw.offsets.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def group_rows(qw: QuantizedWeight) -> int:
    """Stored rows of `values` per group (4-bit values pack two rows of K per stored row; the kernels'
    widths only)."""
    return stored_rows(qw.bits, qw.group_size)
