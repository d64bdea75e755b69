"""Attention of T new query tokens against a KV cache (decode: T = 1; continued prefill: T > 1).

GQA without repeating K/V in memory, ragged per-sequence lengths, optional sliding window.
The reference is plain jnp; Pallas kernels (split-K decode) go beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_impl

PALLAS_BACKENDS: tuple[str, ...] = ()


def cache_attention_ref(q, k, v, q_positions, kv_lengths, window=0, scale=None):
    """Reference attention over the cache.

    q: [B, T, H, D]; k, v: [B, H_kv, S, D] (the cache, new tokens already written);
    q_positions: [B, T] absolute positions of the queries; kv_lengths: [B] valid cache entries;
    window: scalar, 0 for full causal attention, else the sliding-window size.
    Key s is visible from query position p when s <= p, s < kv_length and (window == 0 or s > p - window).
    Returns [B, T, H, D] in q's dtype; scores and softmax are float32.
    """
    batch, steps, heads, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    scale = dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.arange(seq)[None, None, :]
    p = q_positions[:, :, None]
    visible = (s <= p) & (s < kv_lengths[:, None, None]) & ((window <= 0) | (s > p - window))
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # Contracting into [b, k, g, t, d] first lets XLA use one batched matmul (measured ~3x faster on
    # CPU than producing [b, t, k, g, d] directly); the transpose is cheap.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, heads, dim).astype(q.dtype)


def cache_attention(q, k, v, q_positions, kv_lengths, window=0, scale=None, *, impl="auto"):
    """Dispatcher for `cache_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`."""
    resolve_impl(impl, "cache_attention", PALLAS_BACKENDS)
    return cache_attention_ref(q, k, v, q_positions, kv_lengths, window, scale)
