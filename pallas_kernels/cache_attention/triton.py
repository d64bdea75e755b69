"""Split-K ("flash decoding") attention over a KV cache for the Pallas Triton lowering (GPU).

One program per (sequence, kv head x block of query rows, split of the cache) reads each K/V block of
its split once for all the query heads sharing that kv head (rows = T x group), keeps an online softmax
in float32, and writes partial (output, max, sum); `merge_partials` is the second pass that combines
the splits. The draft-tree mask of `tree_attention` is applied inside the same kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.cache_attention.reference import check_cache_inputs, key_ranges
from pallas_kernels.lowering import is_power_of_two, triton_params
from pallas_kernels.online_softmax import initial_state, online_softmax_step


@dataclasses.dataclass(frozen=True)
class CacheAttentionBlockSizes(BlockSizes):
    """Split-K attention over a cache (`cache_attention_pallas`, `tree_attention_pallas`): keys per block,
    query rows (T x group) per program at most (powers of two >= 16 for Triton's dot), and about how many
    programs to launch (a few per SM of an H100's 132) when choosing the split count. Then the Triton
    launch parameters."""

    block_k: int = 64
    max_rows: int = 64
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_k", "max_rows", least=16)


def _split_k_kernel(*refs, scale, rows, row_block, block_k, split_len, seq, quantized, tree):
    """One (sequence, kv head x row block, split) program; refs (after the optional ones):
    lo/hi [R] key range per query row, q [R, D], k/v [S, D] (+ scales [S]), tree prefix [1] and tree
    mask [R, T_tree]; outputs o [R, D] (unnormalised), m [R], denom [R] of this split."""
    lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs = refs
    ks_ref, vs_ref, *refs = refs if quantized else (None, None, *refs)
    prefix_ref, tree_ref, *refs = refs if tree else (None, None, *refs)
    o_ref, m_ref, denom_ref = refs
    dim = q_ref.shape[-1]
    row_blocks = pl.cdiv(rows, row_block)
    first = (pl.program_id(1) % row_blocks) * row_block
    r = first + jnp.arange(row_block)
    row_ok = r < rows
    q = plgpu.load(q_ref.at[pl.ds(first, row_block), :], mask=row_ok[:, None], other=0.0)
    q = (q.astype(jnp.float32) * scale).astype(q_ref.dtype)
    lo = plgpu.load(lo_ref.at[pl.ds(first, row_block)], mask=row_ok, other=seq)
    hi = plgpu.load(hi_ref.at[pl.ds(first, row_block)], mask=row_ok, other=0)
    start = pl.program_id(2) * split_len
    stop = jnp.minimum(start + split_len, seq)
    first_key, last_key = jnp.min(lo), jnp.max(hi)
    if tree:
        prefix = jnp.sum(prefix_ref[...])
        tree_len = tree_ref.shape[-1]
        last_key = jnp.maximum(last_key, prefix + tree_len)
        first_key = jnp.minimum(first_key, prefix)
    begin = jnp.maximum(start, first_key) // block_k
    end = pl.cdiv(jnp.minimum(stop, last_key), block_k)

    def body(j, carry):
        cols = j * block_k + jnp.arange(block_k)
        col_ok = cols < stop
        keys = pl.ds(j * block_k, block_k)
        k = plgpu.load(k_ref.at[keys, :], mask=col_ok[:, None], other=0)
        v = plgpu.load(v_ref.at[keys, :], mask=col_ok[:, None], other=0)
        if quantized:  # dequantize in the kernel: only int8 crosses the memory bus
            k = (k.astype(jnp.float32) * plgpu.load(ks_ref.at[keys], mask=col_ok, other=0.0)[:, None]).astype(q.dtype)
            v = (v.astype(jnp.float32) * plgpu.load(vs_ref.at[keys], mask=col_ok, other=0.0)[:, None]).astype(q.dtype)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & col_ok[None, :]
        if tree:  # draft-tree keys prefix..prefix+T_tree-1: visible where the ancestor mask says so
            c = cols - prefix
            in_tree = (c >= 0) & (c < tree_len) & col_ok
            allowed = plgpu.load(
                tree_ref.at[r[:, None], jnp.where(in_tree, c, 0)[None, :]],
                mask=row_ok[:, None] & in_tree[None, :],
                other=0,
            )
            visible = visible | (allowed != 0)
        return online_softmax_step(*carry, s, visible, v)

    acc, m, denom = jax.lax.fori_loop(begin, end, body, initial_state(row_block, dim))
    plgpu.store(o_ref.at[pl.ds(first, row_block), :], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[pl.ds(first, row_block)], m, mask=row_ok)
    plgpu.store(denom_ref.at[pl.ds(first, row_block)], denom, mask=row_ok)


def _num_splits(programs: int, seq: int, block_k: int, target: int) -> tuple[int, int]:
    """(splits, keys per split): about `target` programs in all, each split a multiple of block_k."""
    splits = max(1, min(pl.cdiv(seq, block_k), pl.cdiv(target, programs)))
    split_len = pl.cdiv(pl.cdiv(seq, splits), block_k) * block_k
    return pl.cdiv(seq, split_len), split_len


def attention_partials_pallas(
    q,
    k,
    v,
    lo,
    hi,
    scale,
    k_scale,
    v_scale,
    tree_prefix,
    tree_mask,
    *,
    blocks: CacheAttentionBlockSizes,
    interpret: bool,
):
    """Split-K partial attention. q: [B, T, H, D]; k, v: [B, H_kv, S, D] (int8 with scales [B, H_kv, S]);
    lo, hi: [B, T] visible key range per query; optionally tree_prefix: [B] and tree_mask: [B, T, T_tree]
    bool (query t also sees key tree_prefix + j where tree_mask[b, t, j]).

    Returns per split (o [B, H_kv, splits, T*G, D] unnormalised float32, m and denom [B, H_kv, splits, T*G]),
    rows ordered (t, g) with H = H_kv * G; combine them with `merge_partials`.
    """
    batch, steps, heads, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if not (is_power_of_two(dim) and dim >= 16):
        raise ValueError(f"cache_attention: the Pallas kernel needs a power-of-two head_dim >= 16, got {dim}")
    rows = steps * group
    row_block = min(blocks.max_rows, max(16, pl.next_power_of_2(rows)))
    row_blocks = pl.cdiv(rows, row_block)
    splits, split_len = _num_splits(batch * kv_heads * row_blocks, seq, blocks.block_k, blocks.target_programs)
    scale = dim**-0.5 if scale is None else scale
    qr = q.reshape(batch, steps, kv_heads, group, dim).transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, dim)
    per_row = lambda a: jnp.repeat(a.astype(jnp.int32), group, axis=1)  # noqa: E731  [B, T] -> [B, R]
    quantized, tree = k_scale is not None, tree_mask is not None
    head = lambda i: i // row_blocks  # noqa: E731  grid axis 1 enumerates (kv head, row block)
    rows_spec = pl.BlockSpec((None, rows), lambda b, i, s: (b, 0))
    cache_spec = pl.BlockSpec((None, None, seq, dim), lambda b, i, s: (b, head(i), 0, 0))
    scale_spec = pl.BlockSpec((None, None, seq), lambda b, i, s: (b, head(i), 0))
    in_specs = [
        rows_spec,
        rows_spec,
        pl.BlockSpec((None, None, rows, dim), lambda b, i, s: (b, head(i), 0, 0)),
        cache_spec,
        cache_spec,
    ]
    args = [per_row(lo), per_row(hi), qr, k, v]
    if quantized:
        in_specs += [scale_spec, scale_spec]
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    if tree:
        tree_len = tree_mask.shape[-1]
        in_specs += [
            pl.BlockSpec((None, 1), lambda b, i, s: (b, 0)),
            pl.BlockSpec((None, rows, tree_len), lambda b, i, s: (b, 0, 0)),
        ]
        args += [tree_prefix.astype(jnp.int32)[:, None], jnp.repeat(tree_mask.astype(jnp.int32), group, axis=1)]

    def out_rows(*block):
        return pl.BlockSpec(
            (None, None, None, rows, *block),  # noqa: E731
            lambda b, i, s: (b, head(i), s, 0) + (0,) * len(block),
        )

    part = (batch, kv_heads, splits, rows)
    kernel = functools.partial(
        _split_k_kernel,
        scale=scale,
        rows=rows,
        row_block=row_block,
        block_k=blocks.block_k,
        split_len=split_len,
        seq=seq,
        quantized=quantized,
        tree=tree,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads * row_blocks, splits),
        in_specs=in_specs,
        out_specs=[out_rows(dim), out_rows(), out_rows()],
        out_shape=[
            jax.ShapeDtypeStruct((*part, dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ],
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="split_k_attention",
    )(*args)


def merge_partials(o, m, denom, steps: int, dtype):
    """The second pass: combine split partials (see `attention_partials_pallas`) -> [B, T, H, D] in
    `dtype`; rows that saw no key are zero."""
    batch, kv_heads, _, rows, dim = o.shape
    m_all = jnp.max(m, axis=2, keepdims=True)
    alpha = jnp.exp(m - m_all)
    total = jnp.sum(denom * alpha, axis=2)
    out = jnp.sum(o * alpha[..., None], axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    out = out.reshape(batch, kv_heads, steps, rows // steps, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, steps, kv_heads * (rows // steps), dim).astype(dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def cache_attention_pallas(
    q,
    k,
    v,
    q_positions,
    kv_lengths,
    window=0,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `cache_attention_ref` (same contract): split-K partials, then `merge_partials`."""
    check_cache_inputs("cache_attention", q, k, v, k_scale, v_scale)
    blocks = CacheAttentionBlockSizes.resolve(block_sizes, "cache_attention")
    lo, hi = key_ranges(q_positions, kv_lengths, window)
    o, m, denom = attention_partials_pallas(
        q, k, v, lo, hi, scale, k_scale, v_scale, None, None, blocks=blocks, interpret=interpret
    )
    return merge_partials(o, m, denom, q.shape[1], q.dtype)
