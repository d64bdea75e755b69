"""The Mosaic TPU block-sparse prefill attention: grid (sequence, head, query block, step), the step axis
sequential with the online softmax in VMEM scratch. Steps 0..K-1 visit the query block's listed key blocks,
fetched through a scalar-prefetched index map (so only listed blocks are ever copied in); the remaining steps
visit the head's columns, gathered beforehand into [C, D] tiles of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_attention.reference import check_sparse_inputs, kernel_indices
from pallas_kernels.lowering import tpu_interpret, tpu_params
from pallas_kernels.online_softmax import scratch_init, scratch_output, scratch_step

COLUMN_TILE = 128  # columns per step: one lane tile of the positions row


def _kernel(
    lengths_ref,
    window_ref,
    blocks_ref,
    q_ref,
    k_ref,
    v_ref,
    cpos_ref,
    ck_ref,
    cv_ref,
    o_ref,
    m_ref,
    denom_ref,
    acc_ref,
    *,
    scale,
    slots,
):
    """q_ref/o_ref, k_ref/v_ref: [block, D] (the key block listed at this step, or a repeat of the last);
    cpos_ref: [1, 128] positions of this step's columns, ck_ref/cv_ref: [128, D]; blocks_ref [B, H, N, K],
    lengths_ref [B], window_ref [1] (SMEM)."""
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    block = q_ref.shape[0]
    length, window = lengths_ref[b], window_ref[0]

    @pl.when(j == 0)
    def _init():
        scratch_init(m_ref, denom_ref, acc_ref)

    def step(keys, values, cols, extra):
        s = jax.lax.dot_general(q_ref[...], keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        rows = i * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        visible = (cols <= rows) & (cols < length) & ((window <= 0) | (cols > rows - window)) & extra
        p, alpha = scratch_step(m_ref, denom_ref, s * scale, visible)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(
            p.astype(values.dtype), values, preferred_element_type=jnp.float32
        )

    @pl.when(j < slots)
    def _block():
        key = blocks_ref[b, h, i, jnp.minimum(j, slots - 1)]
        cols = key * block + jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
        step(k_ref[...], v_ref[...], cols, key >= 0)

    @pl.when(j >= slots)
    def _columns():
        pos = jnp.broadcast_to(cpos_ref[...], (block, COLUMN_TILE))
        listed = jnp.zeros(pos.shape, jnp.bool_)
        for slot in range(slots):  # a column whose block is listed was counted there
            listed = listed | (jax.lax.div(pos, block) == blocks_ref[b, h, i, slot])
        step(ck_ref[...], cv_ref[...], pos, (pos >= 0) & ~listed)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = scratch_output(denom_ref, acc_ref).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block", "interpret"))
def block_sparse_attention_pallas_tpu(
    q, k, v, blocks, columns=None, lengths=None, window=0, scale=None, *, block: int = 64, interpret: bool = False
):
    """Mosaic TPU version of `block_sparse_attention_ref` (same contract). `block` must be a multiple of 16
    (the bf16 sublane tile); any head_dim."""
    check_sparse_inputs(q, k, v, blocks, columns, lengths, block)
    if block % 16:
        raise ValueError(f"block_sparse_attention: the TPU kernel needs a block that is a multiple of 16, got {block}")
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    rep = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    n_blocks = blocks.shape[2]
    padded = n_blocks * block
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    listed = 0 if columns is None else columns.shape[2]
    blocks, columns, ck, cv = kernel_indices(k, v, blocks, columns, steps, COLUMN_TILE)
    slots = blocks.shape[3]
    col_steps = -(-listed // COLUMN_TILE)  # no column step when none are listed (the one -1 tile is never read)
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded - steps), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v))

    def kv_index(b, h, i, j, lengths_ref, window_ref, blocks_ref):
        # Column steps repeat the last listed block's index: not fetched again.
        key = blocks_ref[b, h, i, jnp.minimum(j, slots - 1)]
        return b, jax.lax.div(h, rep), jnp.maximum(key, 0), 0

    def column_index(b, h, i, j, *_):
        return b, h, jnp.maximum(j - slots, 0), 0

    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, slots=slots),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, n_blocks, slots + col_steps),
            in_specs=[
                pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((None, None, block, dim), kv_index),
                pl.BlockSpec((None, None, block, dim), kv_index),
                pl.BlockSpec((None, None, 1, COLUMN_TILE), lambda b, h, i, j, *_: (b, h, 0, jnp.maximum(j - slots, 0))),
                pl.BlockSpec((None, None, COLUMN_TILE, dim), column_index),
                pl.BlockSpec((None, None, COLUMN_TILE, dim), column_index),
            ],
            out_specs=pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0)),
            scratch_shapes=[
                pltpu.VMEM((block, 128), jnp.float32),
                pltpu.VMEM((block, 128), jnp.float32),
                pltpu.VMEM((block, dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded, dim), q.dtype),
        compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name="block_sparse_attention_tpu",
    )(lengths, window, blocks, q, k, v, columns[:, :, None, :], ck, cv)
    return out[:, :, :steps].transpose(0, 2, 1, 3)
