"""The pure-jnp reference of attention over a paged KV cache, the page addressing and int8 page codes.

Each sequence's keys and values live in fixed-size pages of a shared pool, found through its row of a block
table (vLLM's PagedAttention layout), for a ragged batch of new tokens.

k_pages, v_pages: [P, H_kv, page, D] (one layer of the pool); block_tables: [B, M] page ids, so sequence b's
position s lives in page block_tables[b, s // page] at offset s % page. Entries past a sequence's length may
name any page (they are masked).

The reference gathers each sequence's pages into a dense [B, H_kv, M * page, D] cache and runs
`cache_attention_ref` on it.

Streaming rows (`StreamingMask`, StreamingLLM's attention sinks and recent window): from position
`start[b]` on, sequence b's queries see only keys s < sinks[b] and s > p - window[b] (besides the rules above),
so pages wholly between the two can be freed.

Int8 pages: k_pages / v_pages hold int8 codes and k_scales / v_scales [P, H_kv, page, G] one float scale per
position, head and group of D / G channels (`quantize_kv`, symmetric); the gathered cache is dequantized
before attention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.cache_attention import cache_attention_ref
from pallas_kernels.cache_attention.reference import key_ranges, masked_attention


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


# Channels sharing one int8 scale. SmolLM2's keys have outlier channels: one scale per 64-wide head keeps
# 98.2% of float pages' top-1 tokens (teacher-forced over 5 chats x 48 tokens, KL 1.0e-3), one per 32
# channels 99.4% (KL 4.9e-4); 16 and 8 add nothing to the agreement.
KV_GROUP = 32


def kv_groups(dim: int) -> int:
    """Scales per head vector of `dim` channels: one per `KV_GROUP` channels, or one if they do not divide."""
    return dim // KV_GROUP if dim % KV_GROUP == 0 else 1


def quantize_kv(x):
    """x [..., D] -> (int8 codes [..., D], float32 scales [..., G]) with G = kv_groups(D): symmetric, one scale
    per group of channels (max |x| / 127; an all-zero group gets scale 1)."""
    groups = kv_groups(x.shape[-1])
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, -1)
    peak = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return codes.reshape(*codes.shape[:-2], -1), scale


def dequantize_kv(codes, scales, dtype=jnp.float32):
    """Codes [..., D] and scales [..., G] back to values [..., D] in `dtype`."""
    grouped = codes.astype(jnp.float32).reshape(*codes.shape[:-1], scales.shape[-1], -1) * scales[..., None]
    return grouped.reshape(codes.shape).astype(dtype)


def gathered_cache(pages, scales, block_tables, dtype):
    """A sequence-dense cache from pages; int8 pages (with `scales` [P, H_kv, page, G]) dequantized."""
    dense = gather_pages(pages, block_tables)
    if scales is None:
        return dense
    return dequantize_kv(dense, gather_pages(scales, block_tables), dtype)


def check_page_scales(k_pages, k_scales, v_scales) -> None:
    int8 = k_pages.dtype == jnp.int8
    if int8 != (k_scales is not None) or (k_scales is None) != (v_scales is None):
        raise ValueError("ragged_paged_attention: int8 pages need k_scales and v_scales, float pages take none")
    want = (*k_pages.shape[:3], kv_groups(k_pages.shape[3]))
    if int8 and (k_scales.shape != want or v_scales.shape != want):
        raise ValueError(
            f"ragged_paged_attention: scales must be [P, H_kv, page, G] = {want}, got {k_scales.shape}, "
            f"{v_scales.shape}"
        )


class StreamingMask(NamedTuple):
    """Per sequence [B] int32: queries at positions >= start see only the first `sinks` keys and those within
    `window` of them (StreamingLLM); a sequence that does not stream has start >= its length."""

    start: jnp.ndarray
    sinks: jnp.ndarray
    window: jnp.ndarray


def streaming_visible(q_positions, keys: int, streaming: StreamingMask):
    """[B, T, keys] bool: key s is visible to the query at position p under `streaming` (before the causal,
    length and sliding-window rules, which still apply)."""
    p = q_positions[:, :, None]
    s = jnp.arange(keys)[None, None, :]
    start, sinks, window = (x[:, None, None] for x in streaming)
    return (p < start) | (s < sinks) | (s > p - window)


def ragged_paged_attention_ref(
    q,
    k_pages,
    v_pages,
    block_tables,
    q_positions,
    kv_lengths,
    window=0,
    scale=None,
    k_scales=None,
    v_scales=None,
    streaming: StreamingMask | None = None,
):
    """q: [B, T, H, D] (the new tokens, already written to the pages); q_positions: [B, T] their absolute
    positions; kv_lengths: [B] valid positions per sequence; window: 0 or a sliding-window size; k_scales,
    v_scales: the scales of int8 pages (else None); streaming: sinks and a recent window per sequence (see
    `StreamingMask`), or None. Key s is visible from query position p when s <= p, s < kv_length and
    (window == 0 or s > p - window), and streaming allows it; a query that sees no key gives zeros. Returns
    [B, T, H, D] in q's dtype."""
    check_paged_inputs(q, k_pages, v_pages, block_tables)
    check_page_scales(k_pages, k_scales, v_scales)
    k = gathered_cache(k_pages, k_scales, block_tables, q.dtype)
    v = gathered_cache(v_pages, v_scales, block_tables, q.dtype)
    if streaming is None:
        return cache_attention_ref(q, k, v, q_positions, kv_lengths, window, scale)
    lo, hi = key_ranges(q_positions, kv_lengths, window)
    s = jnp.arange(k.shape[2])[None, None, :]
    visible = (s >= lo[..., None]) & (s < hi[..., None]) & streaming_visible(q_positions, k.shape[2], streaming)
    return masked_attention(q, k, v, visible, scale)


def page_slots(block_tables, positions, valid, page_size: int, num_pages: int):
    """Where each new token goes: (page ids [B, T], offsets [B, T]) for `positions` [B, T]; tokens where
    `valid` is False get page id `num_pages` (out of bounds, so a `mode="drop"` scatter skips them)."""
    blocks = jnp.clip(positions // page_size, 0, block_tables.shape[1] - 1)
    page_ids = jnp.take_along_axis(block_tables, blocks, axis=1)
    return jnp.where(valid, page_ids, num_pages), positions % page_size
