"""The quantized weight format that every quantized matmul decodes: `QuantizedWeight`, int4 packing,
symmetric per-group quantization, and the input checks the kernels share."""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

# bits -> (q_min, q_max) of the stored integer codes (read-only: the one source of truth, also for
# the quantizers of `ssm_llm.quant`).
CODE_RANGE = MappingProxyType({8: (-127, 127), 4: (-8, 7)})


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scales", "offsets"],
    meta_fields=["bits", "group_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight w [K, N]; `bits` and `group_size` are static pytree metadata (not leaves).

    values: int8 [K, N] (8 bits) or uint8 [K / 2, N] (4 bits, two values per byte along K);
    scales: [K / group_size, N], float32 or bfloat16;
    offsets: None (symmetric: w = q * scale) or float32 [K / group_size, N] (asymmetric formats such as
    GGUF's Q4_1 / Q4_K: w = q * scale + offset).
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
        return (rows * 2 if self.bits == 4 else rows), n


# Its public home, where pickles look it up (the package re-exports it).
QuantizedWeight.__module__ = "pallas_kernels.quantized_matmul"


def check_layout(bits, group_size, k: int, where: str):
    if bits not in CODE_RANGE:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"{where}: 4-bit weights pack two rows per byte, so K must be even, got K={k}")
    if k % group_size:
        raise ValueError(f"{where}: K ({k}) must be a multiple of group_size ({group_size})")


def check_weight(qw: QuantizedWeight, where: str):
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


def quantize_weights(w, bits: int = 8, group_size: int = 128, scale_dtype=jnp.float32) -> QuantizedWeight:
    """w: [K, N] float -> `QuantizedWeight` with symmetric per-group absmax scales in `scale_dtype`.

    q is rounded against the stored (possibly bfloat16-rounded) scale, so |w - dequantized| <= scale / 2.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weights: w must be 2-D [K, N], got shape {tuple(w.shape)}")
    k, n = w.shape
    check_layout(bits, group_size, k, "quantize_weights")
    q_min, q_max = CODE_RANGE[bits]
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    scales = (jnp.max(jnp.abs(groups), axis=1) / q_max).astype(scale_dtype)
    s32 = scales.astype(jnp.float32)[:, None, :]
    # An all-zero group has scale 0: divide by 1 instead, its q are 0 either way.
    q = jnp.clip(jnp.round(groups / jnp.where(s32 > 0, s32, 1.0)), q_min, q_max).reshape(k, n)
    values = q.astype(jnp.int8) if bits == 8 else pack_int4(q)
    return QuantizedWeight(values, scales, bits, group_size)


def int_values(qw: QuantizedWeight):
    """The quantized values q of `qw` as int32 [K, N]."""
    return qw.values.astype(jnp.int32) if qw.bits == 8 else unpack_int4(qw.values)


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
    """Stored rows of `values` per group (4-bit values pack two rows of K per stored row)."""
    return qw.group_size if qw.bits == 8 else qw.group_size // 2
