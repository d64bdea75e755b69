"""DFloat11: bfloat16 weights with Huffman-coded exponents, decoded just before use (lossless).

`weights.py` holds the format (`DFloat11Weight`), `reference.py` the jnp decoder and `triton.py` the GPU
kernel; the encoder lives in `ssm_llm.compress.dfloat11` (host-side numpy). Decoding gives back the very
bfloat16 bits that were encoded, so a model run on decoded weights computes exactly what it computes on the
originals.

`decompress_tree` decodes every `DFloat11Weight` of a pytree (a layer's weights) in one pass over all their
blocks, the paper's "transformer-block-level decompression"; `take_rows` decodes only the blocks holding some
rows of a 2-D weight (embedding lookups).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.dfloat11.reference import decode_exponents_ref
from pallas_kernels.dfloat11.triton import DFloat11BlockSizes, decode_exponents_pallas
from pallas_kernels.dfloat11.weights import MAX_CODE_BITS, DFloat11Weight, assemble, check_weight
from pallas_kernels.dispatch import resolve_impl

__all__ = [
    "MAX_CODE_BITS",
    "DFloat11BlockSizes",
    "DFloat11Weight",
    "assemble",
    "check_weight",
    "decode_exponents",
    "decode_exponents_pallas",
    "decode_exponents_ref",
    "decompress",
    "decompress_tree",
    "is_dfloat11",
    "take_rows",
]

PALLAS_BACKENDS: tuple[str, ...] = ("gpu",)


def is_dfloat11(x) -> bool:
    """Whether `x` is a `DFloat11Weight` (for `tree_map(..., is_leaf=is_dfloat11)`)."""
    return isinstance(x, DFloat11Weight)


def decode_exponents(
    stream, starts, table, table_base, code_bits: int, steps: int, impl: str = "auto", block_sizes=None
):
    """uint8 [lanes, steps]: `steps` exponents decoded from each lane's start (see `decode_exponents_ref`);
    `impl` as everywhere in `pallas_kernels` ("pallas" on GPU)."""
    impl = resolve_impl(impl, "dfloat11 decode_exponents", PALLAS_BACKENDS)
    if impl == "xla":
        return decode_exponents_ref(stream, starts, table, table_base, code_bits, steps)
    return decode_exponents_pallas(
        stream, starts, table, table_base, code_bits, steps, block_sizes=block_sizes, interpret=impl == "interpret"
    )


def _pieces(w: DFloat11Weight):
    """w's independent tensors (its leading stacked axes flattened): (streams [n, W], starts [n, blocks],
    tables [n, T], sign_mantissa [n, size])."""
    count = math.prod(w.stream.shape[:-1])
    return (
        w.stream.reshape(count, -1),
        w.block_starts.reshape(count, -1),
        w.table.reshape(count, -1),
        w.sign_mantissa.reshape(count, -1),
    )


def decompress_tree(tree, impl: str = "auto", block_sizes=None):
    """`tree` with every `DFloat11Weight` replaced by its bfloat16 array. Weights with the same block and code
    length decode together: their streams and tables side by side, all their blocks as the lanes of one loop."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_dfloat11)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, leaf in enumerate(leaves):
        if is_dfloat11(leaf):
            groups.setdefault((leaf.block, leaf.code_bits), []).append(i)
    for (block, code_bits), members in groups.items():
        pieces = [_pieces(leaves[i]) for i in members]
        streams, starts, tables, bases = [], [], [], []
        word_at, table_at = 0, 0
        for stream, start, table, _ in pieces:
            if 32 * (word_at + stream.shape[0] * stream.shape[1]) >= 2**31:
                raise ValueError(
                    "decompress_tree: the streams exceed int32 bit positions; decode fewer weights at once"
                )
            for t in range(stream.shape[0]):
                streams.append(stream[t])
                starts.append(start[t] + 32 * word_at)
                tables.append(table[t])
                bases.append(jnp.full(start.shape[1], table_at, jnp.int32))
                word_at += stream.shape[1]
                table_at += table.shape[1]
        exponents = decode_exponents(
            jnp.concatenate(streams),
            jnp.concatenate(starts),
            jnp.concatenate(tables),
            jnp.concatenate(bases),
            code_bits,
            block,
            impl,
            block_sizes,
        ).reshape(-1)
        at = 0
        for i, (_, start, _, sign_mantissa) in zip(members, pieces, strict=True):
            count, blocks = start.shape
            size = sign_mantissa.shape[1]
            mine = exponents[at : at + count * blocks * block].reshape(count, blocks * block)[:, :size]
            at += count * blocks * block
            leaves[i] = assemble(sign_mantissa, mine).reshape(leaves[i].shape)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def decompress(w: DFloat11Weight, impl: str = "auto", block_sizes=None) -> jax.Array:
    """The bfloat16 array `w` encodes."""
    return decompress_tree(w, impl, block_sizes)


def take_rows(w: DFloat11Weight, rows: jax.Array, impl: str = "auto", block_sizes=None) -> jax.Array:
    """`decompress(w)[rows]` for a 2-D `w` [R, C] and int rows of any shape, decoding only the blocks that
    hold those rows: bfloat16 [*rows.shape, C]."""
    if w.ndim != 2:
        raise ValueError(f"take_rows: needs a 2-D DFloat11Weight, got shape {w.shape}")
    cols, block = w.shape[1], w.block
    span = -(-cols // block) + 1  # blocks a row can touch
    rows = jnp.asarray(rows, jnp.int32)
    count = w.shape[0]
    flat = rows.reshape(-1)
    flat = jnp.clip(jnp.where(flat < 0, flat + count, flat), 0, count - 1)  # as table[rows] indexes: wrap, clamp
    first = (flat * cols) // block
    blocks = jnp.minimum(first[:, None] + jnp.arange(span), w.block_starts.shape[0] - 1)
    exponents = decode_exponents(
        w.stream,
        jnp.take(w.block_starts, blocks.reshape(-1)),
        w.table,
        jnp.zeros(blocks.size, jnp.int32),
        w.code_bits,
        block,
        impl,
        block_sizes,
    ).reshape(flat.shape[0], span * block)
    skip = flat * cols - first * block
    mine = jax.vmap(lambda e, s: jax.lax.dynamic_slice(e, (s,), (cols,)))(exponents, skip)
    return assemble(jnp.take(w.sign_mantissa, flat, axis=0), mine).reshape(*rows.shape, cols)
