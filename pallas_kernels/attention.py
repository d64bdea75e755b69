"""Causal attention over a KV cache, for prefill (T > 1) and decode (T = 1).

GQA without repeating K/V in memory, ragged per-sequence lengths, optional sliding window.
The reference is plain jnp; the Pallas kernels (flash prefill, split-K decode) sit beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_impl

PALLAS_BACKENDS: tuple[str, ...] = ()


def attention_ref(q, k, v, q_positions, kv_lengths, window=0, scale=None):
    """Reference attention.

    q: [B, T, H, D]; k, v: [B, H_kv, S, D] (the cache, new tokens already written);
    q_positions: [B, T] absolute positions of the queries; kv_lengths: [B] number of valid cache
    entries; window: scalar, 0 for full causal attention, else the sliding-window size.
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
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, steps, heads, dim).astype(q.dtype)


def attention(q, k, v, q_positions, kv_lengths, window=0, scale=None, *, impl="auto"):
    """Dispatcher for `attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`."""
    resolve_impl(impl, "attention", PALLAS_BACKENDS)
    return attention_ref(q, k, v, q_positions, kv_lengths, window, scale)
