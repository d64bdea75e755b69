"""Symmetric integer quantization of tensors with static scales (activations, SSM states, weights).

A value x with scale s maps to the code q = clip(round(x / s), q_min, q_max) and back to q * s, with
(q_min, q_max) = (-127, 127) for 8 bits and the two's-complement (-2^(b-1), 2^(b-1) - 1) below, e.g. (-8, 7)
for 4 bits: the ranges `pallas_kernels.quantized_matmul` stores and decodes, so codes made here can feed its
`QuantizedWeight`. round() is round-half-to-even.
Inside [q_min * s, q_max * s] the error is at most s / 2; beyond it values clip to the nearest end.

`scale` broadcasts against x and must not enlarge it: a scalar (per tensor), a vector over the last axis
(per channel), or a per-group array against `split_groups(x, ...)`. A scale must be >= 0; a zero scale
(a point calibration only ever saw 0 at) gives code 0, which dequantizes to 0.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from pallas_kernels.quantized_matmul import CODE_RANGE as _Q_RANGE  # the codes the kernel decodes


def qrange(bits: int) -> tuple[int, int]:
    """(q_min, q_max) of `bits`-bit codes, bits in 2..8: (-127, 127) for 8, (-8, 7) for 4, (-4, 3) for 3."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in _Q_RANGE:
        raise ValueError(f"bits must be an int in {min(_Q_RANGE)}..{max(_Q_RANGE)}, got {bits!r}")
    return _Q_RANGE[bits]


def _check_scale(x, scale, where: str):
    try:
        fits = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(scale)) == jnp.shape(x)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{where}: scale of shape {tuple(jnp.shape(scale))} must broadcast against x of shape "
            f"{tuple(jnp.shape(x))} without enlarging it"
        )


def quantize(x, scale, bits: int):
    """x: float [...], scale: broadcastable to x -> int8 codes [...] (narrower codes are int8 too, unpacked)."""
    q_min, q_max = qrange(bits)
    _check_scale(x, scale, "quantize")
    x = jnp.asarray(x, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    live = scale > 0
    q = jnp.round(x / jnp.where(live, scale, 1.0))
    return jnp.where(live, jnp.clip(q, q_min, q_max), 0).astype(jnp.int8)


def dequantize(q, scale, dtype=jnp.float32):
    """q: integer codes [...], scale: broadcastable to q -> q * scale [...] in `dtype` (float32 product)."""
    _check_scale(q, scale, "dequantize")
    return (jnp.asarray(q, jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


def fake_quant(x, scale, bits: int):
    """x: float [...] -> dequantize(quantize(x, scale, bits), scale) in x's dtype: the value a simulated
    (fake-quant) reference computes with."""
    x = jnp.asarray(x)
    return dequantize(quantize(x, scale, bits), scale, x.dtype)


def scale_from_absmax(absmax, bits: int):
    """The symmetric scale that maps |x| <= absmax onto the codes: absmax / q_max, float32."""
    return jnp.asarray(absmax, jnp.float32) / qrange(bits)[1]


def absmax_scale(x, bits: int, axis=None, keepdims: bool = False):
    """max |x| over `axis` (None: all, per tensor) / q_max, float32: the round-to-nearest scale.

    Per channel on the last axis: axis=tuple(range(x.ndim - 1)); per group: split_groups(x, g, a) then
    axis=a + 1 with keepdims=True, so the scale broadcasts against the grouped view.
    """
    return scale_from_absmax(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=axis, keepdims=keepdims), bits)


def split_groups(x, group_size: int, axis: int = -1):
    """x with size K on `axis` -> the same values with that axis split into (K / group_size, group_size):
    the group members sit on the new axis right after `axis`."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    size = x.shape[axis]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or size % group_size:
        raise ValueError(
            f"split_groups: group_size must be a positive int dividing axis {axis} (size {size}), got {group_size!r}"
        )
    return x.reshape(*x.shape[:axis], size // group_size, group_size, *x.shape[axis + 1 :])


def merge_groups(x, axis: int = -2):
    """The inverse of `split_groups(·, g, axis)`: merges `axis` (groups) with the member axis after it."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    if axis == x.ndim - 1:
        raise ValueError(f"merge_groups: axis {axis} is the last axis of shape {x.shape}; the member axis follows it")
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
