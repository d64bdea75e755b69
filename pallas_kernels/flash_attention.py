"""Causal self-attention of a prefill: T new tokens at positions 0..T-1 of each sequence.

GQA without repeating K/V, right-padded ragged batches, optional sliding window. The reference
processes queries in blocks and gives each block only the keys up to its last position, so the
masked upper triangle is mostly skipped (about half the work of a dense causal attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_impl

PALLAS_BACKENDS: tuple[str, ...] = ()
DEFAULT_BLOCK = 128


def flash_attention_ref(q, k, v, window=0, scale=None, block: int = DEFAULT_BLOCK):
    """q: [B, T, H, D]; k, v: [B, T, H_kv, D] -> [B, T, H, D] in q's dtype (float32 softmax).

    Query t sees keys s with s <= t and (window == 0 or s > t - window); `window` may be traced.
    Padded positions of shorter sequences (right padding) never influence real ones, by causality.
    """
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if k.shape != v.shape or k.shape[:2] != (batch, steps):
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B, T, H_kv, D] matching q {q.shape}")
    scale = dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    outs = []
    for start in range(0, steps, block):
        stop = min(start + block, steps)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg[:, start:stop], k[:, :stop],
                            preferred_element_type=jnp.float32) * scale
        t = jnp.arange(start, stop)[:, None]
        s = jnp.arange(stop)[None, :]
        visible = (s <= t) & ((window <= 0) | (s > t - window))
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        # Softmax with the normalisation applied after the value product: one pass less over scores.
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype), v[:, :stop],
                         preferred_element_type=jnp.float32)  # [b,k,g,t,d]: one batched matmul on CPU
        outs.append((out / jnp.sum(weights, axis=-1)[..., None]).transpose(0, 3, 1, 2, 4))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return out.reshape(batch, steps, heads, dim).astype(q.dtype)


def flash_attention(q, k, v, window=0, scale=None, *, impl="auto"):
    """Dispatcher for `flash_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`."""
    resolve_impl(impl, "flash_attention", PALLAS_BACKENDS)
    return flash_attention_ref(q, k, v, window, scale)
