"""Split-K attention that reads a paged KV cache in place, for the Pallas Triton lowering (GPU).

One program per (sequence, kv head x block of query rows, split of the sequence's pages) walks its pages
through the sequence's block table, loading each page's keys and values straight from the pool (no gathered
copy), with the online softmax in float32 for all the query heads sharing the kv head; `merge_partials`
(from `cache_attention`) combines the splits. Float pages only: int8 pages go through the gathered path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.cache_attention import key_ranges, merge_partials
from pallas_kernels.lowering import is_power_of_two, triton_params
from pallas_kernels.online_softmax import initial_state, online_softmax_step
from pallas_kernels.ragged_paged_attention.reference import check_paged_inputs


def fits_in_place(dim: int, page: int) -> bool:
    """Whether the kernel takes these shapes: Triton's dot needs a power-of-two head_dim and page >= 16."""
    return is_power_of_two(dim) and dim >= 16 and is_power_of_two(page) and page >= 16


@dataclasses.dataclass(frozen=True)
class PagedAttentionBlockSizes(BlockSizes):
    """In-place paged attention (`ragged_paged_attention_pallas`): query rows (T x group) per program at most
    (a power of two >= 16 for Triton's dot) and about how many programs to launch when choosing how many
    splits a sequence's pages get (a few per SM of an H100's 132). Then the Triton launch parameters. The
    key block is the page: page_size must be a power of two >= 16."""

    max_rows: int = 64
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("max_rows", least=16)


def _paged_kernel(
    lo_ref,
    hi_ref,
    tables_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    denom_ref,
    *,
    scale,
    rows,
    row_block,
    page,
    pages_per_split,
    num_blocks,
):
    """One (sequence, kv head x row block, split) program. lo/hi [R] key range per query row; tables [M] the
    sequence's page ids; q [R, D]; k/v [P, page, D] the whole pool of this kv head; outputs o [R, D]
    (unnormalised), m [R], denom [R] of this split."""
    dim = q_ref.shape[-1]
    row_blocks = pl.cdiv(rows, row_block)
    first = (pl.program_id(1) % row_blocks) * row_block
    row_ok = first + jnp.arange(row_block) < rows
    q = plgpu.load(q_ref.at[pl.ds(first, row_block), :], mask=row_ok[:, None], other=0.0)
    q = (q.astype(jnp.float32) * scale).astype(q_ref.dtype)
    lo = plgpu.load(lo_ref.at[pl.ds(first, row_block)], mask=row_ok, other=num_blocks * page)
    hi = plgpu.load(hi_ref.at[pl.ds(first, row_block)], mask=row_ok, other=0)
    start = pl.program_id(2) * pages_per_split
    stop = jnp.minimum(start + pages_per_split, num_blocks)
    begin = jnp.maximum(start, jnp.min(lo) // page)
    end = jnp.minimum(stop, pl.cdiv(jnp.max(hi), page))

    def body(j, carry):
        page_id = tables_ref[j]
        k = k_ref[page_id, :, :]  # [page, D], read where it lies in the pool
        v = v_ref[page_id, :, :]
        cols = j * page + jnp.arange(page)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        return online_softmax_step(*carry, s, visible, v)

    acc, m, denom = jax.lax.fori_loop(begin, end, body, initial_state(row_block, dim))
    plgpu.store(o_ref.at[pl.ds(first, row_block), :], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[pl.ds(first, row_block)], m, mask=row_ok)
    plgpu.store(denom_ref.at[pl.ds(first, row_block)], denom, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def ragged_paged_attention_pallas(
    q,
    k_pages,
    v_pages,
    block_tables,
    q_positions,
    kv_lengths,
    window=0,
    scale=None,
    *,
    block_sizes: PagedAttentionBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `ragged_paged_attention_ref` (same contract, float pages) reading the pages in place:
    split-K partials over each sequence's pages, then `merge_partials`."""
    check_paged_inputs(q, k_pages, v_pages, block_tables)
    blocks = PagedAttentionBlockSizes.resolve(block_sizes, "ragged_paged_attention")
    batch, steps, heads, dim = q.shape
    num_pages, kv_heads, page, _ = k_pages.shape
    num_blocks = block_tables.shape[1]
    if not fits_in_place(dim, page):
        raise ValueError(
            f"ragged_paged_attention: the Pallas kernel needs a power-of-two head_dim and page_size >= 16, got "
            f"{dim} and {page}"
        )
    group = heads // kv_heads
    rows = steps * group
    row_block = min(blocks.max_rows, max(16, pl.next_power_of_2(rows)))
    row_blocks = pl.cdiv(rows, row_block)
    splits = max(1, min(num_blocks, pl.cdiv(blocks.target_programs, batch * kv_heads * row_blocks)))
    pages_per_split = pl.cdiv(num_blocks, splits)
    splits = pl.cdiv(num_blocks, pages_per_split)
    scale = dim**-0.5 if scale is None else scale
    lo, hi = key_ranges(q_positions, kv_lengths, window)
    per_row = lambda a: jnp.repeat(a.astype(jnp.int32), group, axis=1)  # noqa: E731  [B, T] -> [B, R]
    qr = q.reshape(batch, steps, kv_heads, group, dim).transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, dim)
    head = lambda i: i // row_blocks  # noqa: E731  grid axis 1 enumerates (kv head, row block)
    rows_spec = pl.BlockSpec((None, rows), lambda b, i, s: (b, 0))
    pool_spec = pl.BlockSpec((num_pages, None, page, dim), lambda b, i, s: (0, head(i), 0, 0))
    in_specs = [
        rows_spec,
        rows_spec,
        pl.BlockSpec((None, num_blocks), lambda b, i, s: (b, 0)),
        pl.BlockSpec((None, None, rows, dim), lambda b, i, s: (b, head(i), 0, 0)),
        pool_spec,
        pool_spec,
    ]

    def out_rows(*block):
        return pl.BlockSpec((None, None, None, rows, *block), lambda b, i, s: (b, head(i), s, 0) + (0,) * len(block))

    part = (batch, kv_heads, splits, rows)
    kernel = functools.partial(
        _paged_kernel,
        scale=scale,
        rows=rows,
        row_block=row_block,
        page=page,
        pages_per_split=pages_per_split,
        num_blocks=num_blocks,
    )
    o, m, denom = pl.pallas_call(
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
        name="ragged_paged_attention",
    )(per_row(lo), per_row(hi), block_tables.astype(jnp.int32), qr, k_pages, v_pages)
    return merge_partials(o, m, denom, steps, q.dtype)
