"""Token-slot storage shared by the eviction methods (StreamingLLM, SnapKV, PyramidKV).

Each (layer, sequence, kv head) owns `capacity` slots; a slot holds one kept token's key, value and
original position (-1: empty). Different heads may keep different tokens (SnapKV scores per head),
so positions are per head; attention masks empty slots (and, for sliding-window layers, tokens out
of the window by original position).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import masked_attention
from ssm_llm.cache import KVCache
from ssm_llm.kv.policy import rope_frequencies
from ssm_llm.rope import rotate


@flax.struct.dataclass
class SlotKV:
    """k, v: [L, B, H_kv, S, D]; pos: [L, B, H_kv, S] int32 original positions (-1: empty slot)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def empty_slots(layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype) -> SlotKV:
    """`capacity` empty slots per (layer, sequence, kv head), e.g. a full-precision tail that holds
    decoded tokens after a compressed prompt."""
    shape = (layers, batch, kv_heads, capacity)
    return SlotKV(
        k=jnp.zeros(shape + (head_dim,), dtype),
        v=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, -1, jnp.int32),
    )


def gather_slots(cache: KVCache, keep: jax.Array, capacity: int) -> SlotKV:
    """Slots holding the dense cache's tokens at positions `keep: [L, B, H_kv, n]` (-1: none) in slots
    0..n-1, the remaining `capacity - n` slots empty."""
    n = keep.shape[-1]
    if n > capacity:
        raise ValueError(f"gather_slots: {n} kept tokens do not fit {capacity} slots")
    idx = jnp.maximum(keep, 0)[..., None]
    k = jnp.take_along_axis(cache.k, idx, axis=3)
    v = jnp.take_along_axis(cache.v, idx, axis=3)
    pad = [(0, 0)] * 3 + [(0, capacity - n)]
    return SlotKV(
        k=jnp.pad(k, pad + [(0, 0)]),
        v=jnp.pad(v, pad + [(0, 0)]),
        pos=jnp.pad(keep.astype(jnp.int32), pad, constant_values=-1),
    )


def write_slot(slots: SlotKV, index, slot: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> SlotKV:
    """Write one new token per sequence (k, v: [B, H_kv, D]; positions: [B]) into layer `index`,
    slot `slot: [B]` of every kv head."""
    rows = jnp.arange(k.shape[0])
    return SlotKV(
        k=slots.k.at[index, rows, :, slot].set(k.astype(slots.k.dtype)),
        v=slots.v.at[index, rows, :, slot].set(v.astype(slots.v.dtype)),
        pos=slots.pos.at[index, rows, :, slot].set(positions[:, None].astype(jnp.int32)),
    )


def slot_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, q_positions: jax.Array, window=0
) -> jax.Array:
    """q: [B, T, H_q, D] against slots k, v: [B, H_kv, S, D] with original positions pos: [B, H_kv, S].

    A slot is visible from query position p if it is filled, not after p, and (window > 0) within the
    window by original position. Returns [B, T, H_q, D].
    """
    p = q_positions[:, None, :, None]  # [B, 1, T, 1]
    s = pos[:, :, None, :]  # [B, H_kv, 1, S]
    visible = (s >= 0) & (s <= p)
    visible = visible & jnp.where(window > 0, s > p - window, True)
    return masked_attention(q, k, v, visible)


def prompt_and_tail_attention(
    config, tail: SlotKV, index, q, k, v, positions, prompt_k, prompt_v, prompt_lengths, window
):
    """One decode step over a reconstructed prompt plus the decoded-token tail.

    q: [B, 1, H_q, D], k, v: [B, 1, H_kv, D] pre-RoPE; prompt_k (rotated), prompt_v: [B, H_kv, S, D]
    (tokens s < prompt_lengths[b] are real); the new token goes to tail slot `position - prompt
    length` (the tail holds max_len - S slots, room for every row). Returns (output [B, 1, H_q, D],
    new tail).
    """
    if q.shape[1] != 1:
        raise ValueError(f"a compressed prompt with a tail decodes one token per step, got {q.shape[1]}")
    inv_freq = rope_frequencies(config)
    p = positions[:, 0]
    tail = write_slot(tail, index, p - prompt_lengths, rotate(k[:, 0], p[:, None], inv_freq), v[:, 0], p)
    batch, heads, prompt_len = prompt_k.shape[:3]
    s = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    prompt_pos = jnp.broadcast_to(jnp.where(s < prompt_lengths[:, None], s, -1)[:, None], (batch, heads, prompt_len))
    keys = jnp.concatenate([prompt_k.astype(tail.k.dtype), tail.k[index]], axis=2)
    values = jnp.concatenate([prompt_v.astype(tail.v.dtype), tail.v[index]], axis=2)
    pos = jnp.concatenate([prompt_pos, tail.pos[index]], axis=2)
    q = rotate(q, positions[:, :, None], inv_freq)
    return slot_attention(q, keys, values, pos, positions, window), tail
