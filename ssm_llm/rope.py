"""Rotary position embeddings (the "rotate half" layout used by Hugging Face Llama-style models)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies `[head_dim // 2]` (float32), with linear / llama3 scaling applied.

    Computed in float32 the way `transformers` does, so positions rotate identically.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables `[..., head_dim // 2]` (float32) for integer `positions: [...]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return _cos_sin(angles)
    # On one CPU device computed apart, inside a conditional (XLA fuses nothing across one; both branches are these
    # tables): left to fusion, XLA computed cos and sin again inside every layer's q and k fusions, for every head.
    # A batch-16 SmolLM2 W8A8 decode step on the 2-core EPYC: 25.3 -> 22.0 ms. The same values either way.
    return jax.lax.cond(jnp.any(angles != angles), _cos_sin, _cos_sin, angles)


def _cos_sin(angles):
    """(cos, sin) of `angles`."""
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x: [B, T, H, D]` by `cos, sin: [B, T, D // 2]` (pairs are (i, i + D/2))."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rotate(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotate `x: [..., D]` to integer (possibly negative, which un-rotates) `positions` broadcastable
    to `x.shape[:-1]`; the same rotation as `apply_rope`, for caches laid out `[B, H, S, D]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = _cos_sin(angles)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
