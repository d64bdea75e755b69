"""int8 x int8 -> int32 matrix product for CPU decode: a compiled AVX2 kernel called from XLA (`int8_dot.cc`).

`int8_dot(xq, w)` multiplies activation codes xq [M, K] (int8 in [-127, 127], as W8A8 rounds them) by weight
codes w [K, N] (any int8) with exact int32 sums, the same numbers as `int8_dot_reference` (XLA's integer dot).
`int8_dot_blocked(xq, blocked, n)` does the same on weights in the kernel's blocked layout (`block_weights`,
`BlockedInt8Weight`: each 32-column block of w one contiguous stream), written once at load time: 1.6x faster
than the plain layout at one row, and about as fast as XLA's integer dot from 16 rows up, so W8A8 products of
every size take it; the plain one serves decode's one- and two-row products, where XLA's CPU int8 dot is slow
(see `int8_dot.cc`). The kernel is built on first use (`pallas_kernels.cpu_build`: one library with the CPU
attention kernel), and where it cannot be (not x86-64 AVX2, no compiler) `available()` is False and callers keep
XLA's dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_build import BLOCKED_TARGET, TARGET, available, kernel_dir, unavailable_reason
from pallas_kernels.cpu_int8_dot.weights import (
    COLS,
    GROUP,
    BlockedInt8Weight,
    block_weights,
    blockable,
    to_blocked,
    to_plain,
    unblock_weights,
)

__all__ = [
    "BlockedInt8Weight",
    "available",
    "block_weights",
    "blockable",
    "int8_dot",
    "int8_dot_blocked",
    "int8_dot_reference",
    "kernel_dir",
    "to_blocked",
    "to_plain",
    "unavailable_reason",
    "unblock_weights",
]


def int8_dot_reference(xq: jax.Array, w: jax.Array) -> jax.Array:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] through XLA's dot (exact)."""
    return jax.lax.dot_general(xq, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def int8_dot(xq: jax.Array, w: jax.Array) -> jax.Array:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] through the compiled kernel (CPU only; xq in [-127, 127])."""
    if xq.ndim != 2 or w.ndim != 2 or xq.shape[1] != w.shape[0]:
        raise ValueError(f"int8_dot: x [M, K] and w [K, N] expected, got {tuple(xq.shape)} and {tuple(w.shape)}")
    if xq.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise ValueError(f"int8_dot: int8 operands expected, got {xq.dtype} and {w.dtype}")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"int8_dot: the CPU kernel is unavailable here: {reason}")
    out = jax.ShapeDtypeStruct((xq.shape[0], w.shape[1]), jnp.int32)
    # Under vmap, one call per batch element (the kernel takes two-dimensional operands).
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(xq, w)


def int8_dot_blocked(xq: jax.Array, blocked: jax.Array, n: int) -> jax.Array:
    """int8 [M, K] @ weights in `block_weights`' layout (N = `n` columns) -> int32 [M, N] through the compiled
    kernel (CPU only; xq in [-127, 127]); the same sums as `int8_dot` on the unblocked codes."""
    kg, nb = -(-xq.shape[-1] // GROUP), -(-n // COLS)
    if xq.ndim != 2 or blocked.shape != (nb, kg, COLS * GROUP):
        raise ValueError(
            f"int8_dot_blocked: x [M, K] and blocked w [{nb}, {kg}, {COLS * GROUP}] expected for N={n}, "
            f"got {tuple(xq.shape)} and {tuple(blocked.shape)}"
        )
    if xq.dtype != jnp.int8 or blocked.dtype != jnp.int8:
        raise ValueError(f"int8_dot_blocked: int8 operands expected, got {xq.dtype} and {blocked.dtype}")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"int8_dot_blocked: the CPU kernel is unavailable here: {reason}")
    out = jax.ShapeDtypeStruct((xq.shape[0], n), jnp.int32)
    return jax.ffi.ffi_call(BLOCKED_TARGET, out, vmap_method="sequential")(xq, blocked)
