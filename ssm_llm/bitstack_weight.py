"""A BitStack-compressed weight kept packed in memory: `BitStackWeight`, rebuilt just before its product.

BitStack (`ssm_llm.compress.bitstack`) writes a weight W [in, out] as residual blocks, each one sign bit per weight
times a rank-r magnitude: W ~ diag(1 / s) sum_{k < n} sign_k * (u_k v_k). Holding the first n blocks packed
(signs as bits, u and v in float16) is what makes a memory budget real at run time: `ssm_llm.models.lm_head.linear`
multiplies by `reconstruct(w)`, so the float weight exists only inside the product's program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["signs", "u", "v", "scale"], meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class BitStackWeight:
    """The first n blocks of a weight [in, out] (`shape`, static): signs uint8 [n, ceil(in * out / 8)] (the row-major
    sign bits of each block, most significant bit first as `numpy.packbits`, 1 = negative), u float16 [n, in, r],
    v float16 [n, r, out], scale float16 [in] (the activation scaling the blocks were cut under)."""

    signs: jax.Array
    u: jax.Array
    v: jax.Array
    scale: jax.Array
    shape: tuple[int, int]

    @property
    def dtype(self):
        """What `reconstruct` returns by default (the parameter checks read a float dtype here)."""
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def blocks(self) -> int:
        return self.signs.shape[0]


def check_bitstack(w: BitStackWeight, where: str = "BitStackWeight") -> None:
    """Raise ValueError unless the arrays fit `shape` (a damaged checkpoint fails here, not inside a product)."""
    rows, cols = w.shape
    n = w.signs.shape[0] if w.signs.ndim == 2 else -1
    rank = w.u.shape[-1] if w.u.ndim == 3 else -1
    want = {"signs": (n, -(-rows * cols // 8)), "u": (n, rows, rank), "v": (n, rank, cols), "scale": (rows,)}
    for name, shape in want.items():
        if tuple(getattr(w, name).shape) != shape or n < 0 or rank < 0:
            raise ValueError(f"{where}: {name} has shape {tuple(getattr(w, name).shape)}, expected {shape}")


def reconstruct(w: BitStackWeight, dtype=jnp.float32) -> jax.Array:
    """W [in, out] from the loaded blocks: diag(1 / scale) sum_k sign_k * (u_k v_k), summed in float32 one block at a
    time (no [blocks, in, out] temporary)."""
    rows, cols = w.shape
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)

    def add_block(k, total):
        negative = ((w.signs[k][:, None] >> shifts) & 1).reshape(-1)[: rows * cols].reshape(rows, cols)
        magnitude = w.u[k].astype(jnp.float32) @ w.v[k].astype(jnp.float32)
        return total + jnp.where(negative == 1, -magnitude, magnitude)

    total = jnp.zeros((rows, cols), jnp.float32)
    if w.blocks:  # (no block: zeros; an empty axis cannot be indexed, even by a loop that never runs)
        total = jax.lax.fori_loop(0, w.blocks, add_block, total)
    return (total / w.scale.astype(jnp.float32)[:, None]).astype(dtype)


def stored_bytes(w: BitStackWeight) -> int:
    """Bytes held: the packed signs, the float16 factors and the scale."""
    return sum(int(a.size * a.dtype.itemsize) for a in (w.signs, w.u, w.v, w.scale))
