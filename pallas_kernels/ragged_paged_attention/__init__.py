"""Attention over a paged KV cache (vLLM's PagedAttention layout) for a ragged batch of new tokens.

`reference.py` holds the pure-jnp reference (pages gathered into a dense cache, then `cache_attention_ref`),
the page addressing of new tokens and the int8 page codes; `triton.py` (GPU) a split-K kernel that reads
each sequence's pages in place through its block table. On TPU, and for int8 pages, the dispatcher gathers
the pages (dequantizing int8 ones) and runs the `cache_attention` kernels on the gathered cache. Streaming
rows (`StreamingMask`: StreamingLLM's sinks and window) run the reference on every backend: the kernels
take a sliding window, not sinks.
"""

from __future__ import annotations

import jax

from pallas_kernels.cache_attention import cache_attention, use_pallas
from pallas_kernels.ragged_paged_attention.reference import (
    KV_GROUP,
    StreamingMask,
    check_page_scales,
    check_paged_inputs,
    dequantize_kv,
    gather_pages,
    gathered_cache,
    kv_groups,
    page_slots,
    quantize_kv,
    ragged_paged_attention_ref,
)
from pallas_kernels.ragged_paged_attention.triton import (
    PagedAttentionBlockSizes,
    fits_in_place,
    ragged_paged_attention_pallas,
)

__all__ = [
    "KV_GROUP",
    "PagedAttentionBlockSizes",
    "StreamingMask",
    "check_paged_inputs",
    "dequantize_kv",
    "gather_pages",
    "kv_groups",
    "page_slots",
    "quantize_kv",
    "ragged_paged_attention",
    "ragged_paged_attention_pallas",
    "ragged_paged_attention_ref",
]


def _in_place(kind: str, k_pages, k_scales) -> bool:
    """Whether the in-place kernel runs: float pages, GPU (or interpret mode off TPU), and the shapes
    Triton's dot needs (power-of-two head_dim and page_size >= 16)."""
    _, _, page, dim = k_pages.shape
    shapes = fits_in_place(dim, page)
    on_gpu = (kind == "pallas" and jax.default_backend() == "gpu") or (
        kind == "interpret" and jax.default_backend() != "tpu"
    )
    return k_scales is None and shapes and on_gpu


def ragged_paged_attention(
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
    *,
    block_sizes: PagedAttentionBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `ragged_paged_attention_ref`'s contract; `impl` ("auto", "xla", "pallas", "interpret")
    as in `pallas_kernels.dispatch`. Float pages on GPU (power-of-two head_dim and page_size >= 16): the
    in-place kernel; otherwise the pages gathered (int8 ones dequantized), then `cache_attention`; with
    `streaming`, the reference."""
    check_paged_inputs(q, k_pages, v_pages, block_tables)
    check_page_scales(k_pages, k_scales, v_scales)
    kind = use_pallas(impl, "ragged_paged_attention", q.shape[-1])
    if kind == "xla" or streaming is not None:
        return ragged_paged_attention_ref(
            q, k_pages, v_pages, block_tables, q_positions, kv_lengths, window, scale, k_scales, v_scales, streaming
        )
    if _in_place(kind, k_pages, k_scales):
        return ragged_paged_attention_pallas(
            q,
            k_pages,
            v_pages,
            block_tables,
            q_positions,
            kv_lengths,
            window,
            scale,
            block_sizes=block_sizes,
            interpret=kind == "interpret",
        )
    k = gathered_cache(k_pages, k_scales, block_tables, q.dtype)
    v = gathered_cache(v_pages, v_scales, block_tables, q.dtype)
    return cache_attention(q, k, v, q_positions, kv_lengths, window, scale, impl=kind)
