"""KIVI: 2/4/8-bit asymmetric KV quantization with a full-precision residual of recent tokens.

Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache": keys have outlier
channels, so they are quantized per channel over groups of `group_size` consecutive tokens; values
are quantized per token over groups of channels (`ssm_llm.kv.quantization`). Since a key group needs
`group_size` tokens, the newest tokens wait in full precision in a residual buffer. Parameters:
  bits: 2, 4 or 8 (packed codes), or 16 for no quantization (every token stays in the residual);
  group_size: tokens per key group, and channels per value group (capped at head_dim);
  residual: the residual buffer's size in tokens, a multiple of group_size.

After `n` tokens the first `q(n) = group_size * max(0, (n - residual) // group_size + 1)` tokens are
quantized and the other `n - q(n)` (fewer than `residual`) are full precision: the prompt's full groups
are quantized except the last ones that keep at least `residual - group_size` tokens exact, and when a
decoded token fills the buffer its oldest group is quantized and moved to the quantized part. q(n) is
a function of the length alone, so every layer (and the jitted decode loop) knows it without state.
Keys are stored after RoPE, as in the paper; attention dequantizes them (plain jnp).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import (
    KVPolicy,
    check_positive_int,
    check_within_context,
    layer_slice,
    rope_frequencies,
    round_up,
)
from ssm_llm.kv.quantization import (
    QuantizedTensor,
    check_channel_groups,
    check_policy_bits,
    dequantize,
    quantize_keys,
    quantize_or_keep,
)
from ssm_llm.kv.slots import slot_attention
from ssm_llm.rope import rotate


@flax.struct.dataclass
class KIVICache:
    """keys: QuantizedTensor [L, B, H_kv, C, D] (per channel, groups of tokens) and values (per token),
    positions 0..q-1 of each sequence (None when nothing is ever quantized: bits 16, or a residual that
    holds the whole capacity); residual_k, residual_v: [L, B, H_kv, R, D] full precision, position p in
    slot p % R for p in [q, length)."""

    keys: QuantizedTensor | None
    values: QuantizedTensor | None
    residual_k: jax.Array
    residual_v: jax.Array


@dataclasses.dataclass(frozen=True)
class KIVI(KVPolicy):
    """Per-channel keys, per-token values, a full-precision residual (see the module docstring)."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        check_policy_bits("KIVI", "bits", self.bits)
        check_positive_int("KIVI", "group_size", self.group_size)
        check_positive_int("KIVI", "residual", self.residual)
        if self.residual % self.group_size:
            raise ValueError(f"KIVI: residual ({self.residual}) must be a multiple of group_size ({self.group_size})")

    def check(self, config, prompt_lengths):
        check_channel_groups("KIVI", self.bits, self.group_size, config.head_dim)
        check_within_context("KIVI", "group_size", self.group_size, config, "a key group that long never fills")
        check_within_context(
            "KIVI",
            "residual",
            self.residual,
            config,
            "a residual that long never quantizes a token (bits=16 keeps the full cache)",
        )

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return round_up(max_len, self.group_size)

    def quantized_tokens(self, lengths):
        """q(n) [B]: how many leading tokens are quantized after `lengths: [B]` tokens."""
        if self.bits == 16:
            return jnp.zeros_like(lengths)
        g = self.group_size
        return g * jnp.maximum(0, (lengths - self.residual) // g + 1)

    def sizes(self, capacity: int) -> tuple[int, int]:
        """(residual slots R, quantized slots C) of a cache holding up to `capacity` tokens."""
        if self.bits == 16:
            return capacity, 0
        g = self.group_size
        return min(self.residual, capacity), g * max(0, (capacity - self.residual) // g + 1)

    def compress(self, config, cache, observation, capacity):
        n = cache.lengths
        slots, quantized = self.sizes(capacity)
        # Residual slot s holds the position p in [q, n) with p % slots == s.
        pos = self._residual_positions(n, slots)
        idx = jnp.broadcast_to(
            jnp.minimum(pos, cache.max_len - 1)[None, :, None, :, None], cache.k.shape[:3] + (slots, cache.k.shape[-1])
        )
        data = KIVICache(
            keys=None,
            values=None,
            residual_k=jnp.take_along_axis(cache.k, idx, axis=3),
            residual_v=jnp.take_along_axis(cache.v, idx, axis=3),
        )
        if quantized:  # quantize every group below `quantized` slots; those past q(n) are overwritten later
            pad = [(0, 0)] * 3 + [(0, max(0, quantized - cache.max_len)), (0, 0)]
            k, v = (jnp.pad(x, pad)[:, :, :, :quantized] for x in (cache.k, cache.v))
            data = data.replace(
                keys=quantize_keys(k, self.bits, self.group_size),
                values=quantize_or_keep(v, self.bits, self.group_size, "channels"),
            )
        return data, n

    def _residual_positions(self, lengths, slots):
        """[B, R]: the position each residual slot holds after `lengths` tokens (may be >= lengths: empty)."""
        q = self.quantized_tokens(lengths)[:, None]
        return q + (jnp.arange(slots)[None, :] - q) % slots

    def view(self, config, data: KIVICache, index, lengths):
        """Layer `index` as attention sees it after `lengths: [B]` tokens: keys, values [B, H_kv, S, D]
        (quantized part dequantized, then the residual) and positions [B, H_kv, S] (-1: empty slot)."""
        dtype = data.residual_k.dtype
        pos = self._residual_positions(lengths, data.residual_k.shape[3])
        pos = jnp.where(pos < lengths[:, None], pos, -1)
        keys, values = data.residual_k[index], data.residual_v[index]
        if data.keys is not None:
            kq, vq = (
                dequantize(layer_slice(data.keys, index), dtype),
                dequantize(layer_slice(data.values, index), dtype),
            )
            j = jnp.arange(kq.shape[2])[None, :]
            pos = jnp.concatenate([jnp.where(j < self.quantized_tokens(lengths)[:, None], j, -1), pos], axis=1)
            keys, values = jnp.concatenate([kq, keys], axis=2), jnp.concatenate([vq, values], axis=2)
        return keys, values, jnp.broadcast_to(pos[:, None, :], keys.shape[:3])

    def _flush(self, data: KIVICache, index, lengths) -> KIVICache:
        """Quantize the residual's oldest group into the quantized part, in the rows whose `lengths`
        just filled the buffer (other rows write out of range, which is dropped)."""
        g, rows = self.group_size, jnp.arange(lengths.shape[0])
        q = self.quantized_tokens(lengths)
        flush = q > self.quantized_tokens(lengths - 1)
        tokens = (q - g)[:, None] + jnp.arange(g)[None, :]  # [B, G] the group's positions
        residual_k, residual_v = data.residual_k[index], data.residual_v[index]  # [B, H_kv, R, D]
        slots = (tokens % residual_k.shape[2])[:, None, :, None]
        idx = jnp.broadcast_to(slots, residual_k.shape[:2] + (g, residual_k.shape[3]))
        qk = quantize_keys(jnp.take_along_axis(residual_k, idx, axis=2), self.bits, g)
        qv = quantize_or_keep(jnp.take_along_axis(residual_v, idx, axis=2), self.bits, g, "channels")
        capacity = data.keys.codes.shape[3]
        at = jnp.where(flush[:, None], tokens, capacity)  # [B, G]; out of range: dropped
        group = jnp.where(flush, (q - g) // g, capacity // g)

        # Indexing [index, rows [B, 1], :, at [B, G]] puts (B, G) first: new [B, H, G, ...] -> [B, G, H, ...].
        def per_token(old, new):
            return old.at[index, rows[:, None], :, at].set(jnp.moveaxis(new, 2, 1), mode="drop")

        keys = dataclasses.replace(
            data.keys,
            codes=per_token(data.keys.codes, qk.codes),
            scale=data.keys.scale.at[index, rows, :, group].set(qk.scale[:, :, 0], mode="drop"),
            zero=data.keys.zero.at[index, rows, :, group].set(qk.zero[:, :, 0], mode="drop"),
        )
        values = dataclasses.replace(
            data.values,
            codes=per_token(data.values.codes, qv.codes),
            scale=per_token(data.values.scale, qv.scale),
            zero=per_token(data.values.zero, qv.zero),
        )
        return data.replace(keys=keys, values=values)

    def attend(self, config, data: KIVICache, step: AttentionStep, q, k, v, impl):
        index, positions, lengths, window = step.layer, step.positions, step.lengths, step.window
        if q.shape[1] != 1:
            raise ValueError(f"KIVI decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        p, rows = positions[:, 0], jnp.arange(q.shape[0])
        slot = p % data.residual_k.shape[3]

        def write(old, new):
            return old.at[index, rows, :, slot].set(new.astype(old.dtype))

        data = data.replace(
            residual_k=write(data.residual_k, rotate(k[:, 0], p[:, None], inv_freq)),
            residual_v=write(data.residual_v, v[:, 0]),
        )
        if data.keys is not None:
            data = self._flush(data, index, lengths)
        keys, values, pos = self.view(config, data, index, lengths)
        q = rotate(q, positions[:, :, None], inv_freq)
        return slot_attention(q, keys, values, pos, positions, window), data
