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


def reconstruct(w: BitStackWeight, dtype=jnp.float32) -> jax.Array:
    """W [in, out] from the loaded blocks: diag(1 / scale) sum_k sign_k * (u_k v_k), summed in float32."""
    rows, cols = w.shape
    bits = (w.signs[:, :, None] >> jnp.arange(7, -1, -1, dtype=jnp.uint8)) & 1
    negative = bits.reshape(w.blocks, 8 * w.signs.shape[1])[:, : rows * cols].reshape(w.blocks, rows, cols)
    magnitude = jnp.einsum("kir,kro->kio", w.u.astype(jnp.float32), w.v.astype(jnp.float32))
    total = jnp.sum(jnp.where(negative == 1, -magnitude, magnitude), axis=0)
    return (total / w.scale.astype(jnp.float32)[:, None]).astype(dtype)


def stored_bytes(w: BitStackWeight) -> int:
    """Bytes held: the packed signs, the float16 factors and the scale."""
    return sum(int(a.size * a.dtype.itemsize) for a in (w.signs, w.u, w.v, w.scale))
