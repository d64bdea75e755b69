"""Group-wise asymmetric integer quantization of K/V tensors, with packed 2/4/8-bit storage.

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") observed
that keys have outlier *channels* and values do not: keys are quantized per channel (each group of
`group_size` consecutive tokens shares one scale and zero point per channel) and values per token
(each group of `group_size` consecutive channels of a token shares one). Each group maps its
[min, max] range onto the 2^bits codes:
    scale = (max - min) / (2^bits - 1),  code = clip(round((x - min) / scale), 0, 2^bits - 1),
    x_hat = code * scale + min,          so |x - x_hat| <= scale / 2.
Codes are packed 8 / bits per byte along the last (channel) axis, so a 2-bit cache really takes a
quarter of the int8 bytes; `cache_bytes` counts what any cache pytree holds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 4, 8)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "zero"],
    meta_fields=["bits", "axis", "group_size", "channels"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor x [..., S, D]. codes: uint8 [..., S, D * bits / 8] (packed along D);
    scale, zero: float32, one per group (size 1 along the grouped axis' within-group dimension).
    `axis` is "tokens" (groups of tokens per channel: keys) or "channels" (groups of channels per
    token: values); `channels` is D before packing."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int
    axis: str
    group_size: int
    channels: int


def _check(x, bits, group_size, axis):
    if bits not in BITS:
        raise ValueError(f"quantize: bits must be one of {BITS}, got {bits!r}")
    if axis not in ("tokens", "channels"):
        raise ValueError(f"quantize: axis must be 'tokens' or 'channels', got {axis!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quantize: group_size must be a positive int, got {group_size!r}")
    if x.ndim < 2:
        raise ValueError(f"quantize: x must be [..., S, D], got shape {tuple(x.shape)}")
    size = x.shape[-2] if axis == "tokens" else x.shape[-1]
    if size % group_size:
        raise ValueError(f"quantize: the {axis} axis ({size}) must be a multiple of group_size ({group_size})")
    per_byte = 8 // bits
    if x.shape[-1] % per_byte:
        raise ValueError(
            f"quantize: {bits}-bit codes pack {per_byte} per byte along D, so D ({x.shape[-1]}) "
            f"must be a multiple of {per_byte}"
        )


def pack_codes(codes, bits: int):
    """codes: integers in [0, 2^bits) [..., D] -> uint8 [..., D * bits / 8]; code j of a byte sits in
    bits j*bits .. (j+1)*bits - 1 (the first code in the low bits)."""
    per_byte = 8 // bits
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    return jnp.bitwise_or.reduce(c << shifts, axis=-1) if per_byte > 1 else c[..., 0]


def unpack_codes(packed, bits: int):
    """The inverse of `pack_codes`: uint8 [..., D * bits / 8] -> uint8 codes [..., D]."""
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def group_view(x, group_size, axis):
    """x [..., S, D] -> the same values with the group as its own axis: [..., S/G, G, D] (tokens) or
    [..., S, D/G, G] (channels); the statistics reduce over the returned axis."""
    if axis == "tokens":
        return x.reshape(*x.shape[:-2], x.shape[-2] // group_size, group_size, x.shape[-1]), -2
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size), -1


def quantize(x, bits: int, group_size: int, axis: str) -> QuantizedTensor:
    """x: [..., S, D] float -> QuantizedTensor (see the module docstring). axis: "tokens" or "channels"."""
    _check(x, bits, group_size, axis)
    groups, reduce = group_view(x.astype(jnp.float32), group_size, axis)
    low = jnp.min(groups, axis=reduce, keepdims=True)
    high = jnp.max(groups, axis=reduce, keepdims=True)
    levels = (1 << bits) - 1
    scale = (high - low) / levels
    # A constant group has scale 0: its codes are 0 and it dequantizes to `low` exactly.
    codes = jnp.clip(jnp.round((groups - low) / jnp.where(scale > 0, scale, 1.0)), 0, levels)
    codes = codes.reshape(x.shape)
    return QuantizedTensor(pack_codes(codes, bits), scale, low, bits, axis, group_size, x.shape[-1])


def dequantize(q: QuantizedTensor, dtype=jnp.float32):
    """QuantizedTensor -> x_hat [..., S, D] in `dtype`."""
    codes = unpack_codes(q.codes, q.bits).astype(jnp.float32)
    groups, _ = group_view(codes, q.group_size, q.axis)
    return (groups * q.scale + q.zero).reshape(codes.shape).astype(dtype)


def quantize_keys(k, bits: int, group_size: int) -> QuantizedTensor:
    """KIVI keys: k [..., S, D] quantized per channel over groups of `group_size` tokens."""
    return quantize(k, bits, group_size, "tokens")


def quantize_values(v, bits: int, group_size: int) -> QuantizedTensor:
    """KIVI values: v [..., S, D] quantized per token over groups of `group_size` channels."""
    return quantize(v, bits, group_size, "channels")


def cache_bytes(cache) -> int:
    """Bytes held by every array leaf of a cache pytree (a KVCache, a compressed cache, ...)."""
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(cache)))


POLICY_BITS = BITS + (16,)  # what quantized KV policies accept; 16 means "keep full precision"


def check_policy_bits(method: str, name: str, bits) -> None:
    """A clear ValueError unless `bits` is one of POLICY_BITS (2, 4, 8, or 16 = no quantization)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in POLICY_BITS:
        raise ValueError(f"{method}: {name} must be one of {POLICY_BITS} (16: no quantization), got {bits!r}")


def check_channel_groups(method: str, bits: int, group_size: int, width: int, what: str = "head_dim") -> None:
    """A clear ValueError unless vectors of `width` channels (`what` names it) quantize at `bits` in groups
    of `group_size` channels, capped at `width` as `quantize_or_keep` caps them: the group must divide
    the width and the codes must fill whole bytes. Bits 16 (no quantization) fits any width."""
    if bits == 16:
        return
    group = min(group_size, width)
    if width % group:
        raise ValueError(
            f"{method}: group_size ({group_size}) does not fit {what} ({width}): the channels axis "
            f"({width}) must be a multiple of group_size ({group}), or group_size at least {width}"
        )
    per_byte = 8 // bits
    if width % per_byte:
        raise ValueError(
            f"{method}: {bits}-bit codes pack {per_byte} per byte, so {what} ({width}) must be a multiple of {per_byte}"
        )


def quantize_or_keep(x, bits: int, group_size: int, axis: str, dtype=jnp.float32):
    """`quantize(x, bits, group_size, axis)` for bits in BITS; bits 16 keeps x as a plain `dtype` array.
    Channel groups are capped at D (a group_size of 32 quantizes a 16-wide head as one group)."""
    if bits == 16:
        return x.astype(dtype)
    return quantize(x, bits, min(group_size, x.shape[-1]) if axis == "channels" else group_size, axis)


def dequantize_or_keep(x, dtype=jnp.float32):
    """The inverse of `quantize_or_keep`: dequantize a QuantizedTensor, pass a plain array through."""
    return dequantize(x, dtype) if isinstance(x, QuantizedTensor) else x.astype(dtype)
