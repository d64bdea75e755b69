"""Per-output-channel int8 weights in the CPU kernel's blocked layout (`BlockedInt8Weight`), and the conversions
from and to the plain [K, N] codes of a `QuantizedWeight`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul import QuantizedWeight

COLS = 32  # columns per block of the blocked layout (one 32-byte vector per group of K)
GROUP = 4  # consecutive rows of K in each 32-bit lane


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["k", "n"])
@dataclasses.dataclass(frozen=True)
class BlockedInt8Weight:
    """An 8-bit weight w [K, N] with one scale per output channel, stored for the CPU kernel
    (`int8_dot_blocked`): values int8 [..., ceil(N / 32), ceil(K / 4), 128] (`block_weights`), scales
    [..., 1, N] (w = values * scales, as the `QuantizedWeight` it came from); `k`, `n` static. Leading axes
    (a stacked layer axis) are allowed."""

    values: jax.Array
    scales: jax.Array
    k: int
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the unquantized weight."""
        return self.k, self.n


BlockedInt8Weight.__module__ = "pallas_kernels.cpu_int8_dot"


def block_weights(w: jax.Array) -> jax.Array:
    """int8 codes [..., K, N] -> the kernel's blocked layout [..., ceil(N / 32), ceil(K / 4), 128], zero-padded:
    byte (b, g, 4 c + j) holds w[4 g + j, 32 b + c], so the K x 32 codes of one column block are one contiguous
    stream and each 32-bit lane holds four consecutive k of one column."""
    *lead, k, n = w.shape
    kg, nb = -(-k // GROUP), -(-n // COLS)
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, kg * GROUP - k), (0, nb * COLS - n)])
    w = w.reshape(*lead, kg, GROUP, nb, COLS)
    axes = len(lead)
    w = w.transpose(*range(axes), axes + 2, axes, axes + 3, axes + 1)
    return w.reshape(*lead, nb, kg, COLS * GROUP)


def unblock_weights(blocked: jax.Array, k: int, n: int) -> jax.Array:
    """The inverse of `block_weights`: [..., ceil(N / 32), ceil(K / 4), 128] -> int8 [..., K, N]."""
    *lead, nb, kg, _ = blocked.shape
    axes = len(lead)
    w = blocked.reshape(*lead, nb, kg, COLS, GROUP).transpose(*range(axes), axes + 1, axes + 3, axes, axes + 2)
    return w.reshape(*lead, kg * GROUP, nb * COLS)[..., :k, :n]


def blockable(w) -> bool:
    """Whether `w` is a `QuantizedWeight` the blocked layout can hold: 8 bits, one scale per output channel
    (group = K), symmetric."""
    return isinstance(w, QuantizedWeight) and w.bits == 8 and w.offsets is None and w.scales.shape[-2] == 1


def to_blocked(w: QuantizedWeight) -> BlockedInt8Weight:
    """`w` (see `blockable`) in the blocked layout: the same codes and scales."""
    if not blockable(w):
        raise ValueError(
            "to_blocked: an 8-bit symmetric QuantizedWeight with one scale per output channel expected, got "
            f"bits={getattr(w, 'bits', None)}, group_size={getattr(w, 'group_size', None)}"
            f"{', with offsets' if getattr(w, 'offsets', None) is not None else ''}"
        )
    k, n = w.values.shape[-2:]
    return BlockedInt8Weight(block_weights(w.values), w.scales, k, n)


def to_plain(w: BlockedInt8Weight) -> QuantizedWeight:
    """The `QuantizedWeight` [K, N] a `BlockedInt8Weight` holds (the inverse of `to_blocked`)."""
    return QuantizedWeight(unblock_weights(w.values, w.k, w.n), w.scales, bits=8, group_size=w.k)
