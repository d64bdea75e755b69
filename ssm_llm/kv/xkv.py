"""xKV: one truncated SVD per group of adjacent layers, sharing a token-side basis.

Chang et al., 2025, "xKV: Cross-Layer SVD for KV-Cache Compression": the dominant singular vectors
of adjacent layers' KV caches are well aligned, even where single tokens are not similar across
layers. For each group of `group_size` adjacent layers and each sequence, the group's keys
(separately: values) are laid side by side, X = [X_l1, X_l2, ...]: [tokens, group_size * H_kv * D],
and truncated to rank r by SVD, X ~ U_r diag(s_r) V_r^T. Only the factors are stored: the shared
basis A = U_r diag(sqrt(s_r)) [tokens, r] per group and, per layer, its block of
B = diag(sqrt(s_r)) V_r^T [r, H_kv * D]; layer i's cache is rebuilt as A @ B_i inside attention.
By Eckart-Young the squared Frobenius error of a group is the sum of its discarded s_i^2.

As in the paper (after ShadowKV), keys are factored *before* RoPE, where they are lower-rank: the
cached keys are un-rotated, and the rebuilt ones rotated again at their positions. Parameters:
  group_size: adjacent layers per group (the last group may be smaller); 1 is per-layer SVD;
  rank: the key rank r of each group's basis (the paper scales it with the group: 96 * group_size
    for Llama-3.1-8B at 64K tokens), capped at min(prompt tokens, group_size * H_kv * D), where
    the factorization is exact;
  value_rank: the value rank (default: 1.5 * rank, the paper's key:value ratio; values are less
    low-rank than pre-RoPE keys).
Decoded tokens go to a full-precision per-layer tail of `max_len - prompt_len` slots.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, rope_frequencies
from ssm_llm.kv.slots import SlotKV, empty_slots, prompt_and_tail_attention
from ssm_llm.rope import rotate


@flax.struct.dataclass
class XKVData:
    """key_basis / value_basis: [groups, B, S, r] each group's shared token basis (A);
    key_maps / value_maps: [L, B, r, H_kv * D] each layer's reconstruction matrix (B_i);
    prompt_lengths: [B]; tail: `SlotKV` [L, B, H_kv, max_len - S, D] of decoded tokens."""

    key_basis: jax.Array
    key_maps: jax.Array
    value_basis: jax.Array
    value_maps: jax.Array
    prompt_lengths: jax.Array
    tail: SlotKV


def cross_layer_svd(x: jax.Array, group_size: int, rank: int):
    """x: [L, B, H, S, D] -> (basis [groups, B, S, r], maps [L, B, r, H * D]) with
    x[l, b] ~ (basis[l // group_size, b] @ maps[l, b]) laid out [S, H, D]; r = min(rank, S,
    group_size * H * D). The last group is padded with zero layers (same singular values)."""
    layers, batch, heads, tokens, dim = x.shape
    groups = -(-layers // group_size)
    x = jnp.pad(x.astype(jnp.float32), [(0, groups * group_size - layers)] + [(0, 0)] * 4)
    stacked = x.reshape(groups, group_size, batch, heads, tokens, dim).transpose(0, 2, 4, 1, 3, 5)
    stacked = stacked.reshape(groups, batch, tokens, group_size * heads * dim)
    u, s, vt = jnp.linalg.svd(stacked, full_matrices=False)
    r = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :r])
    basis = u[..., :r] * root[..., None, :]
    maps = (root[..., None] * vt[..., :r, :]).reshape(groups, batch, r, group_size, heads * dim)
    maps = maps.transpose(0, 3, 1, 2, 4).reshape(groups * group_size, batch, r, heads * dim)[:layers]
    return basis, maps


def rebuild(basis: jax.Array, maps: jax.Array, heads: int) -> jax.Array:
    """basis: [B, S, r] @ maps: [B, r, H * D] -> [B, H, S, D]."""
    x = jnp.einsum("bsr,brc->bsc", basis, maps, preferred_element_type=jnp.float32)
    return x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class XKV(KVPolicy):
    """Grouped cross-layer SVD of the prompt cache (see the module docstring)."""

    rank: int
    group_size: int = 2
    value_rank: int | None = None

    def __post_init__(self):
        check_positive_int("XKV", "rank", self.rank)
        check_positive_int("XKV", "group_size", self.group_size)
        if self.value_rank is not None:
            check_positive_int("XKV", "value_rank", self.value_rank)

    @property
    def ranks(self) -> tuple[int, int]:
        """(key rank, value rank) before capping at the matrix size."""
        return self.rank, self.value_rank or math.ceil(1.5 * self.rank)

    def check(self, config, prompt_lengths):
        if self.group_size > config.num_layers:
            raise ValueError(
                f"XKV: group_size ({self.group_size}) must not exceed the model's {config.num_layers} "
                f"layers: a group is padded with zero layers up to group_size"
            )

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def compress(self, config, cache, observation, capacity):
        L, batch, heads, prompt_len, dim = cache.k.shape
        valid = (jnp.arange(prompt_len)[None, :] < cache.lengths[:, None])[None, :, None, :, None]
        # Zero the padding rows so they add nothing to the SVD; un-rotate keys to pre-RoPE.
        k = rotate(jnp.where(valid, cache.k, 0), -jnp.arange(prompt_len), rope_frequencies(config))
        v = jnp.where(valid, cache.v, 0)
        key_rank, value_rank = self.ranks
        key_basis, key_maps = cross_layer_svd(k, self.group_size, key_rank)
        value_basis, value_maps = cross_layer_svd(v, self.group_size, value_rank)
        dtype = cache.k.dtype
        data = XKVData(
            key_basis=key_basis.astype(dtype),
            key_maps=key_maps.astype(dtype),
            value_basis=value_basis.astype(dtype),
            value_maps=value_maps.astype(dtype),
            prompt_lengths=cache.lengths,
            tail=empty_slots(L, batch, heads, capacity - prompt_len, dim, dtype),
        )
        # The prompt fills all S positions of every row (padding included): `used` counts the tail's room.
        return data, jnp.full_like(cache.lengths, prompt_len)

    def reconstruct(self, config, data: XKVData, index):
        """The prompt keys (rotated) and values [B, H_kv, S, D] of layer `index` (int or traced)."""
        group = index // self.group_size
        heads = config.num_kv_heads
        k = rebuild(data.key_basis[group], data.key_maps[index], heads)
        k = rotate(k, jnp.arange(k.shape[2]), rope_frequencies(config))
        return k, rebuild(data.value_basis[group], data.value_maps[index], heads)

    def attend(self, config, data: XKVData, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        prompt_k, prompt_v = self.reconstruct(config, data, index)
        out, tail = prompt_and_tail_attention(
            config, data.tail, index, q, k, v, positions, prompt_k, prompt_v, data.prompt_lengths, window
        )
        return out, data.replace(tail=tail)
