"""The Pallas (Triton) block-sparse prefill attention: one program per (sequence, head, query block) walks
only the key blocks listed for its query block, then the head's listed columns (gathered beforehand into a
compact [C, D] per head), with one online softmax over both. Masked blocks are never loaded: the work is
proportional to what is listed, which is what MInference's kernels do for its vertical-slash and
block-sparse patterns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sparse_attention.reference import check_sparse_inputs, kernel_indices
from pallas_kernels.lowering import is_power_of_two, triton_params
from pallas_kernels.online_softmax import initial_state, online_softmax_step


@dataclasses.dataclass(frozen=True)
class BlockSparseBlockSizes(BlockSizes):
    """Columns per step of the column loop (a power of two >= 16, Triton's dot) and the Triton launch
    parameters. The query and key block is the pattern's `block` itself (the indices are per block). Not yet
    measured on a GPU: the defaults are those of `FlashAttentionBlockSizes`."""

    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_c", least=16)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kernel(
    length_ref, window_ref, ids_ref, q_ref, k_ref, v_ref, cpos_ref, ck_ref, cv_ref, o_ref, *, scale, block, block_c
):
    """q_ref/o_ref: [T_pad, D] of this head; k_ref/v_ref: [T_pad, D] of its kv head; ids_ref: [K] this query
    block's key blocks (-1: none); cpos_ref: [C] the head's column positions, ck_ref/cv_ref: [C, D] their keys
    and values; length_ref, window_ref: [1]."""
    dim = q_ref.shape[-1]
    first = pl.program_id(2) * block
    rows = first + jnp.arange(block)
    q = q_ref[pl.ds(first, block), :]
    q = (q.astype(jnp.float32) * scale).astype(q_ref.dtype)
    length, window = jnp.sum(length_ref[...]), jnp.sum(window_ref[...])
    ids = ids_ref[...]

    def seen(cols):
        return (
            (cols[None, :] <= rows[:, None])
            & (cols[None, :] < length)
            & ((window <= 0) | (cols[None, :] > rows[:, None] - window))
        )

    def key_block(slot, carry):
        key = jnp.sum(jnp.where(jnp.arange(ids.shape[0]) == slot, ids, 0))
        start = jnp.maximum(key, 0) * block
        k = k_ref[pl.ds(start, block), :]
        v = v_ref[pl.ds(start, block), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return online_softmax_step(*carry, s, seen(start + jnp.arange(block)) & (key >= 0), v)

    carry = jax.lax.fori_loop(0, ids.shape[0], key_block, initial_state(block, dim))

    def column_block(j, carry):
        pos = cpos_ref[pl.ds(j * block_c, block_c)]
        k = ck_ref[pl.ds(j * block_c, block_c), :]
        v = cv_ref[pl.ds(j * block_c, block_c), :]
        # (A max of ints, not jnp.any: Triton's lowering has no reduce_or.)
        listed = jnp.max(((pos // block)[:, None] == ids[None, :]).astype(jnp.int32), axis=1) > 0
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return online_softmax_step(*carry, s, seen(pos) & ((pos >= 0) & ~listed)[None, :], v)

    acc, _, denom = jax.lax.fori_loop(0, cpos_ref.shape[0] // block_c, column_block, carry)
    o_ref[pl.ds(first, block), :] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block", "block_sizes", "interpret"))
def block_sparse_attention_pallas(
    q,
    k,
    v,
    blocks,
    columns=None,
    lengths=None,
    window=0,
    scale=None,
    *,
    block: int = 64,
    block_sizes: BlockSparseBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `block_sparse_attention_ref` (same contract). head_dim and `block` must be powers of
    two >= 16. The listed block ids are padded to a power of two with -1, the columns to a multiple of
    `block_c` (their keys and values gathered per head before the call)."""
    check_sparse_inputs(q, k, v, blocks, columns, lengths, block)
    sizes = BlockSparseBlockSizes.resolve(block_sizes, "block_sparse_attention")
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    rep = heads // kv_heads
    if not (is_power_of_two(dim) and dim >= 16 and is_power_of_two(block) and block >= 16):
        raise ValueError(
            "block_sparse_attention: the Pallas kernel needs a power-of-two head_dim and block >= 16, "
            f"got {dim} and {block}"
        )
    scale = dim**-0.5 if scale is None else scale
    n_blocks = blocks.shape[2]
    padded = n_blocks * block
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    blocks, columns, ck, cv = kernel_indices(k, v, blocks, columns, steps, sizes.block_c)
    slots = _next_power_of_two(blocks.shape[3])
    blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, 0), (0, slots - blocks.shape[3])), constant_values=-1)
    n_cols = columns.shape[2]
    pad = ((0, 0), (0, padded - steps), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    per_head = pl.BlockSpec((None, padded, None, dim), lambda b, h, i: (b, 0, h, 0))
    per_kv_head = pl.BlockSpec((None, padded, None, dim), lambda b, h, i: (b, 0, h // rep, 0))
    per_column_head = pl.BlockSpec((None, None, n_cols, dim), lambda b, h, i: (b, h, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block=block, block_c=sizes.block_c),
        grid=(batch, heads, n_blocks),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
            pl.BlockSpec((1,), lambda b, h, i: (0,)),
            pl.BlockSpec((None, None, None, slots), lambda b, h, i: (b, h, i, 0)),
            per_head,
            per_kv_head,
            per_kv_head,
            pl.BlockSpec((None, None, n_cols), lambda b, h, i: (b, h, 0)),
            per_column_head,
            per_column_head,
        ],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(interpret, sizes.num_warps, sizes.num_stages),
        interpret=interpret,
        name="block_sparse_attention",
    )(lengths[:, None], window, blocks, q, k, v, columns, ck, cv)
    return out[:, :steps]
