"""RotateKV: low-bit KV quantization after a Hadamard rotation of pre-RoPE keys, attention sinks kept.

Su et al., 2025, "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware
Adaptive Rotations". A few key channels carry outliers that blow up a per-token quantization range;
an orthogonal Walsh-Hadamard transform (`ssm_llm.hadamard.fwht`) spreads them over all channels, so
every token can be quantized on its own (per token, over groups of channels: no residual buffer is
needed, each decoded token is quantized at once). What this implementation keeps of the paper:
  - pre-RoPE grouped-head rotation: keys are un-rotated from RoPE, and `head_group` kv heads are
    concatenated and rotated together (head_group * head_dim must be a power of two), smoothing
    outliers across heads; attention dequantizes, rotates back and applies RoPE at each position;
  - values are rotated per head (as in QuaRot) and quantized per token the same way;
  - attention sinks: the first `sinks` tokens stay in full precision (the paper finds sinks from
    massive activations; the first tokens are the usual ones).
Left out: the outlier-aware channel reordering, which needs offline calibration per model.
Keys are quantized per token after rotation, as in QuaRot; per-token keys need fewer scales than
KIVI's per-channel ones (no residual), but on SmolLM2-135M 2-bit keys lose more than KIVI's (see
tests/kv/test_kv_quant_policies.py); 4 bits is close to the full cache.
Parameters: bits (2, 4, 8; 16 = no quantization), group_size (channels per quantization group after
rotation, capped at head_group * head_dim for keys and head_dim for values), sinks, head_group.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.hadamard import fwht
from ssm_llm.kv.policy import KVPolicy, check_positive_int, layer_slice, rope_frequencies
from ssm_llm.kv.quantization import (
    QuantizedTensor,
    check_channel_groups,
    check_policy_bits,
    dequantize_or_keep,
    quantize_or_keep,
)
from ssm_llm.kv.slots import slot_attention
from ssm_llm.rope import rotate


@flax.struct.dataclass
class RotateKVCache:
    """sink_k, sink_v: [L, B, H_kv, N, D] the first N = min(sinks, capacity) positions, full precision
    (keys after RoPE); keys: [L, B, H_kv / head_group, S, head_group * D] rotated pre-RoPE keys and
    values: [L, B, H_kv, S, D] rotated values of positions N.. N + S - 1 (QuantizedTensor per token,
    or plain arrays at 16 bits)."""

    sink_k: jax.Array
    sink_v: jax.Array
    keys: QuantizedTensor | jax.Array
    values: QuantizedTensor | jax.Array


def rotate_heads(x, head_group: int):
    """x: [..., H, S, D] -> [..., H / head_group, S, head_group * D]: each group's heads side by side,
    Hadamard-rotated together."""
    *lead, heads, steps, dim = x.shape
    x = x.reshape(*lead, heads // head_group, head_group, steps, dim)
    return fwht(jnp.swapaxes(x, -3, -2).reshape(*lead, heads // head_group, steps, head_group * dim))


def unrotate_heads(x, head_group: int):
    """The inverse of `rotate_heads`: [..., H / head_group, S, head_group * D] -> [..., H, S, D]."""
    *lead, groups, steps, width = x.shape
    x = fwht(x).reshape(*lead, groups, steps, head_group, width // head_group)
    return jnp.swapaxes(x, -3, -2).reshape(*lead, groups * head_group, steps, width // head_group)


def _fit(x, size: int):
    """x [L, B, H, S, D] cut or zero-padded to `size` tokens."""
    return jnp.pad(x, [(0, 0)] * 3 + [(0, max(0, size - x.shape[3])), (0, 0)])[:, :, :, :size]


@dataclasses.dataclass(frozen=True)
class RotateKV(KVPolicy):
    """Hadamard-rotated per-token K/V quantization with full-precision sinks (see the module docstring)."""

    bits: int = 2
    group_size: int = 128
    sinks: int = 4
    head_group: int = 1

    def __post_init__(self):
        check_policy_bits("RotateKV", "bits", self.bits)
        check_positive_int("RotateKV", "group_size", self.group_size)
        check_positive_int("RotateKV", "sinks", self.sinks, minimum=0)
        check_positive_int("RotateKV", "head_group", self.head_group)

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def check(self, config, prompt_lengths):
        width = self.head_group * config.head_dim
        if config.num_kv_heads % self.head_group:
            raise ValueError(
                f"RotateKV: head_group ({self.head_group}) must divide the model's {config.num_kv_heads} kv heads"
            )
        if width & (width - 1):
            raise ValueError(
                f"RotateKV: head_group * head_dim ({self.head_group} * {config.head_dim}) must be a "
                f"power of two for the Walsh-Hadamard transform"
            )
        check_channel_groups("RotateKV", self.bits, self.group_size, width, "head_group * head_dim")
        check_channel_groups("RotateKV", self.bits, self.group_size, config.head_dim)

    def _store(self, k, v, dtype):
        """Pre-RoPE keys and values [..., H_kv, S, D] -> their rotated, quantized (or kept) forms."""
        return (
            quantize_or_keep(rotate_heads(k, self.head_group), self.bits, self.group_size, "channels", dtype),
            quantize_or_keep(fwht(v), self.bits, self.group_size, "channels", dtype),
        )

    def compress(self, config, cache, observation, capacity):
        sinks = min(self.sinks, capacity)
        k, v = (_fit(x[:, :, :, sinks:], capacity - sinks) for x in (cache.k, cache.v))
        positions = sinks + jnp.arange(capacity - sinks)
        keys, values = self._store(rotate(k, -positions, rope_frequencies(config)), v, cache.k.dtype)
        data = RotateKVCache(sink_k=_fit(cache.k, sinks), sink_v=_fit(cache.v, sinks), keys=keys, values=values)
        return data, cache.lengths

    def view(self, config, data: RotateKVCache, index, lengths):
        """Layer `index` as attention sees it after `lengths: [B]` tokens: keys (after RoPE), values
        [B, H_kv, S, D] and positions [B, H_kv, S] (-1: empty slot); slot = position."""
        dtype = data.sink_k.dtype

        sinks = data.sink_k.shape[3]
        k = unrotate_heads(dequantize_or_keep(layer_slice(data.keys, index)), self.head_group)
        k = rotate(k, sinks + jnp.arange(k.shape[2]), rope_frequencies(config))
        v = fwht(dequantize_or_keep(layer_slice(data.values, index)))
        keys = jnp.concatenate([data.sink_k[index], k.astype(dtype)], axis=2)
        values = jnp.concatenate([data.sink_v[index], v.astype(dtype)], axis=2)
        j = jnp.arange(keys.shape[2])[None, :]
        return keys, values, jnp.broadcast_to(jnp.where(j < lengths[:, None], j, -1)[:, None, :], keys.shape[:3])

    def attend(self, config, data: RotateKVCache, step: AttentionStep, q, k, v, impl):
        index, positions, lengths, window = step.layer, step.positions, step.lengths, step.window
        if q.shape[1] != 1:
            raise ValueError(f"RotateKV decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        p, rows = positions[:, 0], jnp.arange(q.shape[0])
        sinks = data.sink_k.shape[3]
        body = jax.tree_util.tree_leaves(data.keys)[0].shape[3]
        # A token goes to the sinks or to the rotated store; the other write is out of range (dropped).
        at_sink, at_body = jnp.where(p < sinks, p, sinks), jnp.where(p >= sinks, p - sinks, body)

        def write(old, new, at):
            return old.at[index, rows, :, at].set(new.astype(old.dtype), mode="drop")

        new_k, new_v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H_kv, 1, D]
        keys, values = self._store(new_k, new_v, data.sink_k.dtype)
        data = RotateKVCache(
            sink_k=write(data.sink_k, rotate(new_k[:, :, 0], p[:, None], inv_freq), at_sink),
            sink_v=write(data.sink_v, new_v[:, :, 0], at_sink),
            keys=jax.tree_util.tree_map(lambda old, new: write(old, new[:, :, 0], at_body), data.keys, keys),
            values=jax.tree_util.tree_map(lambda old, new: write(old, new[:, :, 0], at_body), data.values, values),
        )
        all_k, all_v, pos = self.view(config, data, index, lengths)
        q = rotate(q, positions[:, :, None], inv_freq)
        return slot_attention(q, all_k, all_v, pos, positions, window), data
