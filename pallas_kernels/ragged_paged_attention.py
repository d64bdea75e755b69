"""Attention over a paged KV cache: each sequence's keys and values live in fixed-size pages of a shared pool,
found through its row of a block table (vLLM's PagedAttention layout), for a ragged batch of new tokens.

k_pages, v_pages: [P, H_kv, page, D] (one layer of the pool); block_tables: [B, M] page ids, so sequence b's
position s lives in page block_tables[b, s // page] at offset s % page. Entries past a sequence's length may
name any page (they are masked).

The reference gathers each sequence's pages into a dense [B, H_kv, M * page, D] cache and runs
`cache_attention_ref` on it; the dispatcher runs the same gather and then the `cache_attention` kernels
(split-K Triton / Mosaic TPU) on the gathered cache. A kernel that reads the pages in place (no gathered
copy) is not built yet.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.cache_attention import cache_attention, cache_attention_ref


def check_paged_inputs(q, k_pages, v_pages, block_tables) -> None:
    """Raise ValueError naming the mismatch unless the shapes fit the layout above."""
    if q.ndim != 4 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"ragged_paged_attention: q [B, T, H, D] and k_pages, v_pages [P, H_kv, page, D] expected, got "
            f"{q.shape}, {k_pages.shape}, {v_pages.shape}"
        )
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"ragged_paged_attention: block_tables must be [B={q.shape[0]}, M], got {block_tables.shape}")
    if q.shape[2] % k_pages.shape[1] or q.shape[3] != k_pages.shape[3]:
        raise ValueError(f"ragged_paged_attention: q {q.shape} does not fit pages {k_pages.shape} (heads, head_dim)")


def gather_pages(pages, block_tables):
    """[P, H_kv, page, D] and [B, M] -> each sequence's dense cache [B, H_kv, M * page, D]."""
    gathered = pages[block_tables]  # [B, M, H_kv, page, D]
    batch, blocks, heads, page, dim = gathered.shape
    return gathered.transpose(0, 2, 1, 3, 4).reshape(batch, heads, blocks * page, dim)


def ragged_paged_attention_ref(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, window=0, scale=None):
    """q: [B, T, H, D] (the new tokens, already written to the pages); q_positions: [B, T] their absolute
    positions; kv_lengths: [B] valid positions per sequence; window: 0 or a sliding-window size. Key s is
    visible from query position p when s <= p, s < kv_length and (window == 0 or s > p - window); a query that
    sees no key gives zeros. Returns [B, T, H, D] in q's dtype."""
    check_paged_inputs(q, k_pages, v_pages, block_tables)
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    return cache_attention_ref(q, k, v, q_positions, kv_lengths, window, scale)


def ragged_paged_attention(
    q, k_pages, v_pages, block_tables, q_positions, kv_lengths, window=0, scale=None, *, impl="auto"
):
    """Dispatcher for `ragged_paged_attention_ref`'s contract: the pages gathered, then `cache_attention` with
    `impl` ("auto", "xla", "pallas", "interpret")."""
    check_paged_inputs(q, k_pages, v_pages, block_tables)
    if impl == "xla":
        return ragged_paged_attention_ref(q, k_pages, v_pages, block_tables, q_positions, kv_lengths, window, scale)
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    return cache_attention(q, k, v, q_positions, kv_lengths, window, scale, impl=impl)


def page_slots(block_tables, positions, valid, page_size: int, num_pages: int):
    """Where each new token goes: (page ids [B, T], offsets [B, T]) for `positions` [B, T]; tokens where
    `valid` is False get page id `num_pages` (out of bounds, so a `mode="drop"` scatter skips them)."""
    blocks = jnp.clip(positions // page_size, 0, block_tables.shape[1] - 1)
    page_ids = jnp.take_along_axis(block_tables, blocks, axis=1)
    return jnp.where(valid, page_ids, num_pages), positions % page_size
