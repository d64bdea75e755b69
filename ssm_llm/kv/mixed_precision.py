"""Importance-aware mixed-precision KV cache: important prompt tokens in high precision, the rest in low.

Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
Precision Quantization" (MiKV): instead of evicting the tokens an importance score ranks low (H2O,
SnapKV), keep them in a few bits, and keep the important ones in high precision, so no context is
lost. Importance here is SnapKV's: the attention the last `window` prompt queries pay to each prompt
token, summed over the window and the query heads of each kv head (so every kv head picks its own
tokens). Storage (what `cache_bytes` counts):
  - every prompt token at `low_bits`: keys per channel over groups of `group_size` tokens, values per
    token (KIVI's quantizers); the prompt's last partial group is padded with its last real token;
  - a second, `high_bits` copy (per token) of each kv head's `important` top-scored tokens, with their
    positions; attention reads these instead of their low-bit codes;
  - decoded tokens in full precision, after the prompt (slots in use = prompt slots + decoded tokens):
    `max_len - prompt_len` of them, prompt_len being the padded prompt length, for every row.
Parameters: high_bits, low_bits (2, 4, 8, or 16 = full precision; low_bits <= high_bits); important
(a token count, or a fraction of the padded prompt length); window (observed prompt queries);
group_size (tokens per low-bit key group, channels per value / high-bit group, capped at head_dim).
Left out: MiKV's channel balancing of keys against queries.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import (
    KVPolicy,
    check_budget,
    check_positive_int,
    check_within_context,
    layer_slice,
    observed_attention,
    resolve_budget,
    rope_frequencies,
    round_up,
)
from ssm_llm.kv.quantization import (
    QuantizedTensor,
    check_channel_groups,
    check_policy_bits,
    dequantize_or_keep,
    quantize_or_keep,
)
from ssm_llm.kv.slots import SlotKV, empty_slots, slot_attention, write_slot
from ssm_llm.rope import rotate


@flax.struct.dataclass
class MixedPrecisionCache:
    """low_k, low_v: [L, B, H_kv, P, D] every prompt slot at low_bits (slot = position);
    high_k, high_v: [L, B, H_kv, K, D] the important tokens at high_bits, high_pos: [L, B, H_kv, K] their
    positions (-1: none); tail: full-precision slots of the decoded tokens; prompt_lengths: [B]."""

    low_k: QuantizedTensor | jax.Array
    low_v: QuantizedTensor | jax.Array
    high_k: QuantizedTensor | jax.Array
    high_v: QuantizedTensor | jax.Array
    high_pos: jax.Array
    tail: SlotKV
    prompt_lengths: jax.Array


def attention_importance(queries, q_positions, keys, lengths):
    """How much attention the observed queries pay to each key.

    queries: [L, B, W, H_q, D] and keys: [L, B, H_kv, S, D], both after RoPE; q_positions: [B, W] the
    queries' positions (-1: none); lengths: [B] real keys per sequence. Returns [L, B, H_kv, S]: the
    causal softmax attention summed over the W queries and the H_q / H_kv query heads of each kv head;
    -inf for keys past a sequence's length.
    """
    L, B = keys.shape[:2]

    def flat(x):
        return x.reshape(L * B, *x.shape[2:])

    attn = observed_attention(flat(keys), flat(queries), jnp.tile(q_positions, (L, 1)))
    scores = attn.sum(axis=2).reshape(L, B, keys.shape[2], keys.shape[3])
    s = jnp.arange(keys.shape[3])
    return jnp.where(s < lengths[None, :, None, None], scores, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class MixedPrecisionKV(KVPolicy):
    """Important prompt tokens at high_bits, the others at low_bits (see the module docstring)."""

    high_bits: int = 8
    low_bits: int = 2
    important: int | float = 0.2
    window: int = 32
    group_size: int = 32

    def __post_init__(self):
        check_policy_bits("MixedPrecisionKV", "high_bits", self.high_bits)
        check_policy_bits("MixedPrecisionKV", "low_bits", self.low_bits)
        if self.low_bits > self.high_bits:
            raise ValueError(
                f"MixedPrecisionKV: low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})"
            )
        check_budget("MixedPrecisionKV", self.important, "important")
        check_positive_int("MixedPrecisionKV", "window", self.window)
        check_positive_int("MixedPrecisionKV", "group_size", self.group_size)

    @property
    def observation_window(self) -> int:
        return self.window

    def check(self, config, prompt_lengths):
        for bits in (self.high_bits, self.low_bits):
            check_channel_groups("MixedPrecisionKV", bits, self.group_size, config.head_dim)
        check_within_context(
            "MixedPrecisionKV",
            "group_size",
            self.group_size,
            config,
            "low-bit keys are quantized in groups of that many tokens",
        )

    def prompt_slots(self, prompt_len: int) -> int:
        """Low-bit slots for a (padded) prompt of `prompt_len` tokens: whole key groups."""
        return round_up(prompt_len, self.group_size)

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return self.prompt_slots(prompt_len) + max(0, max_len - prompt_len)

    def compress(self, config, cache, observation, capacity):
        n, S = cache.lengths, cache.max_len
        P = self.prompt_slots(S)
        count = min(resolve_budget("MixedPrecisionKV", self.important, S, "important"), S)
        scores = attention_importance(observation.queries, observation.positions, cache.k, n)
        top, idx = jax.lax.top_k(scores, count)  # [L, B, H_kv, K]

        def take(x):
            return jnp.take_along_axis(x, idx[..., None], axis=3)

        def high(x):
            return quantize_or_keep(take(x), self.high_bits, self.group_size, "channels", x.dtype)

        # Pad the prompt to whole groups with each row's last real token, so padding never widens a range.
        pos = jnp.arange(P)[None, :]
        fill = jnp.where(pos < n[:, None], pos, n[:, None] - 1)[None, :, None, :, None]

        def low(x, axis):
            return quantize_or_keep(
                jnp.take_along_axis(
                    x, jnp.broadcast_to(jnp.minimum(fill, S - 1), x.shape[:3] + (P, x.shape[4])), axis=3
                ),
                self.low_bits,
                self.group_size,
                axis,
                x.dtype,
            )

        L, B, H, _, D = cache.k.shape
        data = MixedPrecisionCache(
            low_k=low(cache.k, "tokens"),
            low_v=low(cache.v, "channels"),
            high_k=high(cache.k),
            high_v=high(cache.v),
            high_pos=jnp.where(jnp.isfinite(top), idx, -1).astype(jnp.int32),
            tail=empty_slots(L, B, H, capacity - P, D, cache.k.dtype),
            prompt_lengths=n,
        )
        return data, jnp.full_like(n, P)

    def view(self, config, data: MixedPrecisionCache, index, lengths):
        """Layer `index` as attention sees it: keys (after RoPE), values [B, H_kv, S, D] and positions
        [B, H_kv, S] (-1: empty slot), the prompt's important tokens read from their high-bit copy
        (`lengths` is unused: every stored token is visible)."""
        dtype = data.tail.k.dtype

        k, v = (
            dequantize_or_keep(layer_slice(data.low_k, index), dtype),
            dequantize_or_keep(layer_slice(data.low_v, index), dtype),
        )
        B, H, P, _ = k.shape
        at = data.high_pos[index]
        at = jnp.where(at >= 0, at, P)  # [B, H_kv, K]; no token: out of range, dropped
        b, h = jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None]
        k = k.at[b, h, at].set(dequantize_or_keep(layer_slice(data.high_k, index), dtype), mode="drop")
        v = v.at[b, h, at].set(dequantize_or_keep(layer_slice(data.high_v, index), dtype), mode="drop")
        j = jnp.arange(P)[None, :]
        pos = jnp.broadcast_to(jnp.where(j < data.prompt_lengths[:, None], j, -1)[:, None, :], (B, H, P))
        return (
            jnp.concatenate([k, data.tail.k[index]], axis=2),
            jnp.concatenate([v, data.tail.v[index]], axis=2),
            jnp.concatenate([pos, data.tail.pos[index]], axis=2),
        )

    def attend(self, config, data: MixedPrecisionCache, step: AttentionStep, q, k, v, impl):
        index, positions, used, lengths, window = step.layer, step.positions, step.used, step.lengths, step.window
        if q.shape[1] != 1:
            raise ValueError(f"MixedPrecisionKV decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        p = positions[:, 0]
        slot = used - jax.tree_util.tree_leaves(data.low_k)[0].shape[3]  # decoded tokens follow the prompt slots
        tail = write_slot(data.tail, index, slot, rotate(k[:, 0], p[:, None], inv_freq), v[:, 0], p)
        data = data.replace(tail=tail)
        keys, values, pos = self.view(config, data, index, lengths)
        q = rotate(q, positions[:, :, None], inv_freq)
        return slot_attention(q, keys, values, pos, positions, window), data
