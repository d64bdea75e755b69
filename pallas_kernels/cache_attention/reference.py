"""Attention over a KV cache, in pure jnp: the reference, the masked attention it reduces to (also used by
the draft-tree reference and the compressed caches), and the checks the kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_cache_inputs(name, q, k, v, k_scale, v_scale):
    """Shared shape checks of attention over a cache (also used by `tree_attention`)."""
    batch, _, heads, dim = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"{name}: k {k.shape} and v {v.shape} must be [B, H_kv, S, D] matching q {q.shape}")
    if heads % k.shape[1]:
        raise ValueError(f"{name}: query heads ({heads}) must be a multiple of kv heads ({k.shape[1]})")
    quantized = jnp.issubdtype(k.dtype, jnp.integer)
    if quantized != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(
            f"{name}: int8 k/v need k_scale and v_scale (and float k/v none); got k {k.dtype}, "
            f"k_scale {'given' if k_scale is not None else 'None'}, "
            f"v_scale {'given' if v_scale is not None else 'None'}"
        )
    for label, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and s.shape != k.shape[:3]:
            raise ValueError(f"{name}: {label} must be [B, H_kv, S] = {k.shape[:3]}, got {s.shape}")


def dequantize_cache(k, v, k_scale, v_scale, dtype):
    """int8 K/V with per-token scales [B, H_kv, S] -> `dtype`; float K/V pass through."""
    if k_scale is None:
        return k, v
    return (
        (k.astype(jnp.float32) * k_scale[..., None]).astype(dtype),
        (v.astype(jnp.float32) * v_scale[..., None]).astype(dtype),
    )


def masked_attention(q, k, v, visible, scale=None):
    """q: [B, T, H, D]; k, v: [B, H_kv, S, D]; visible: [B, T, S] bool, or [B, H_kv, T, S] when each kv
    head sees its own keys (compressed caches) -> [B, T, H, D] in q's dtype.
    Float32 softmax; a row that sees no key is zero."""
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = visible[:, None, None] if visible.ndim == 3 else visible[:, :, None]  # -> [B, K|1, 1, T, S]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # Contracting into [b, k, g, t, d] first lets XLA use one batched matmul (measured ~3x faster on
    # CPU than producing [b, t, k, g, d] directly); the transpose is cheap.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = jnp.where(jnp.any(visible, axis=-1)[..., None], out, 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, heads, dim).astype(q.dtype)


def key_ranges(q_positions, kv_lengths, window):
    """Per query [B, T]: keys s with lo <= s < hi are visible (causal, cache length, window)."""
    hi = jnp.minimum(q_positions + 1, kv_lengths[:, None])
    lo = jnp.where(window > 0, jnp.maximum(q_positions - window + 1, 0), 0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def cache_visible(q_positions, kv_lengths, window, seq: int):
    """[B, T, S] bool: the cache slots each query sees (`key_ranges` over S slots)."""
    lo, hi = key_ranges(q_positions, kv_lengths, window)
    s = jnp.arange(seq)[None, None, :]
    return (s >= lo[..., None]) & (s < hi[..., None])


def layer_of(layer, *arrays):
    """`arrays` (every layer's cache [L, ...], or None) at `layer`; as they are where `layer` is None."""
    return arrays if layer is None else tuple(None if a is None else a[layer] for a in arrays)


def cache_attention_ref(q, k, v, q_positions, kv_lengths, window=0, scale=None, k_scale=None, v_scale=None):
    """Reference attention over the cache.

    q: [B, T, H, D]; k, v: [B, H_kv, S, D] (the cache, new tokens already written), float or int8
    with k_scale, v_scale: [B, H_kv, S] per-token scales (k = k_int8 * k_scale); q_positions: [B, T]
    absolute positions of the queries; kv_lengths: [B] valid cache entries; window: scalar, 0 for full
    causal attention, else the sliding-window size. Key s is visible from query position p when
    s <= p, s < kv_length and (window == 0 or s > p - window); a query that sees no key gives zeros.
    Returns [B, T, H, D] in q's dtype; scores and softmax are float32.
    """
    check_cache_inputs("cache_attention", q, k, v, k_scale, v_scale)
    visible = cache_visible(q_positions, kv_lengths, window, k.shape[2])
    k, v = dequantize_cache(k, v, k_scale, v_scale, q.dtype)
    return masked_attention(q, k, v, visible, scale)
