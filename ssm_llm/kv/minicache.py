"""MiniCache: adjacent layers share one merged KV cache (compression along the depth).

Liu et al., 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models":
from the middle of the stack on, the KV states of adjacent layers point in nearly the same
directions. Each pair of layers (l, l+1) keeps, per token and kv head, one merged *direction* (the
SLERP of the two unit vectors) and each layer's own *magnitude*, so layer l's vector is restored as
norm_l * direction. With Omega = arccos(<u_l, u_{l+1}>) the angle between the unit vectors:
    direction = sin((1 - t) Omega) / sin(Omega) * u_l + sin(t Omega) / sin(Omega) * u_{l+1}.
Token pairs whose angular distance d = Omega / pi is large do not merge well; they are *retained*:
both layers' original vectors are stored next to their indices and overwrite the restored ones.

Parameters:
  start_layer: the first merged layer (default None: the middle, num_layers // 2); layers
    start_layer, start_layer + 1 form the first pair, and so on; earlier layers (and a last layer
    left without a partner) are stored unmerged. start_layer = num_layers merges nothing.
  t: the SLERP parameter in [0, 1] (the paper's 0.6 leans towards the deeper layer l + 1).
  retention_threshold: gamma in [0, 1] (paper: 0.05). Per pair, sequence and kv head, with d_min,
    d_max the smallest and largest distances over the prompt, tokens with
    d > d_max - gamma * (d_max - d_min) are retained: gamma = 0 retains nothing, gamma = 1 every
    token above the minimum. (The paper's retention-set equation reads d < d_min + gamma (d_max -
    d_min), which would retain the *most similar* pairs; we follow its text, which retains the
    distinct pairs that merging would damage.)
  max_retained: retention slots per pair, sequence and kv head, so shapes stay static: a token
    count (int >= 0) or a fraction of the prompt (float in [0, 1]); the most distant candidates
    are kept first.
The merge is rotation-equivariant, so keys are merged as cached (RoPE-rotated). Decoded tokens go
to a full-precision per-layer tail of `max_len - prompt_len` slots.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int
from ssm_llm.kv.slots import SlotKV, empty_slots, prompt_and_tail_attention
from ssm_llm.option_spec import is_real, shown


@flax.struct.dataclass
class MergedKV:
    """Keys or values of P merged layer pairs (side 0: the shallower layer, 1: the deeper one).

    direction: [P, B, H_kv, S, D] merged unit directions; norm: [P, 2, B, H_kv, S] each layer's
    magnitudes; kept_index: [P, B, H_kv, R] int32 retained token positions (-1: unused slot);
    kept: [P, 2, B, H_kv, R, D] both layers' original vectors of the retained tokens.
    """

    direction: jax.Array
    norm: jax.Array
    kept_index: jax.Array
    kept: jax.Array


@flax.struct.dataclass
class MiniCacheData:
    """full_k, full_v: [U, B, H_kv, S, D] the unmerged layers; keys, values: `MergedKV`;
    prompt_lengths: [B]; tail: `SlotKV` [L, B, H_kv, max_len - S, D] of decoded tokens."""

    full_k: jax.Array
    full_v: jax.Array
    keys: MergedKV
    values: MergedKV
    prompt_lengths: jax.Array
    tail: SlotKV


def slerp_merge(a: jax.Array, b: jax.Array, t: float):
    """SLERP merge of vectors a, b: [..., D] -> (direction [..., D], |a| [...], |b| [...],
    angular distance Omega / pi [...]). Parallel (or zero) pairs fall back to linear weights."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norm_a, norm_b = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    ua, ub = a / jnp.maximum(norm_a, tiny)[..., None], b / jnp.maximum(norm_b, tiny)[..., None]
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, axis=-1), -1.0, 1.0))
    sin = jnp.sin(omega)
    degenerate = sin < 1e-6
    safe = jnp.where(degenerate, 1.0, sin)
    wa = jnp.where(degenerate, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    wb = jnp.where(degenerate, t, jnp.sin(t * omega) / safe)
    return wa[..., None] * ua + wb[..., None] * ub, norm_a, norm_b, omega / jnp.pi


def _check_fraction(name: str, value) -> None:
    if not is_real(value) or not 0 <= value <= 1:
        raise ValueError(f"MiniCache: {name} must be a number in [0, 1], got {shown(value)}")


@dataclasses.dataclass(frozen=True)
class MiniCache(KVPolicy):
    """Cross-layer SLERP merging of adjacent layer pairs (see the module docstring)."""

    start_layer: int | None = None
    t: float = 0.6
    retention_threshold: float = 0.05
    max_retained: int | float = 0.1

    def __post_init__(self):
        if self.start_layer is not None:
            check_positive_int("MiniCache", "start_layer", self.start_layer, minimum=0)
        _check_fraction("t", self.t)
        _check_fraction("retention_threshold", self.retention_threshold)
        if isinstance(self.max_retained, float):
            _check_fraction("max_retained", self.max_retained)
        else:
            check_positive_int("MiniCache", "max_retained", self.max_retained, minimum=0)

    def check(self, config, prompt_lengths):
        self.layout(config.num_layers)  # start_layer must lie in [0, num_layers]

    def layout(self, num_layers: int):
        """(unmerged layers, merged pairs (l, l + 1)) for a stack of `num_layers` layers."""
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        if start > num_layers:
            raise ValueError(f"MiniCache: start_layer must lie in [0, num_layers = {num_layers}], got {start}")
        pairs = [(layer, layer + 1) for layer in range(start, num_layers - 1, 2)]
        merged = {layer for pair in pairs for layer in pair}
        return [layer for layer in range(num_layers) if layer not in merged], pairs

    def retained_slots(self, prompt_len: int) -> int:
        """Retention slots R per pair, sequence and kv head for a prompt of `prompt_len` tokens."""
        if isinstance(self.max_retained, float):
            return min(prompt_len, math.ceil(self.max_retained * prompt_len))
        return min(prompt_len, self.max_retained)

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def _merge(self, x, pairs, valid, slots) -> MergedKV:
        """x: [L, B, H, S, D] (padding zeroed), valid: [B, S] -> the pairs' `MergedKV`."""
        first, second = (x[np.array([pair[side] for pair in pairs], dtype=np.int32)] for side in (0, 1))
        direction, norm_a, norm_b, distance = slerp_merge(first, second, self.t)
        valid = valid[None, :, None, :]
        d_min = jnp.min(jnp.where(valid, distance, jnp.inf), axis=-1, keepdims=True)
        d_max = jnp.max(jnp.where(valid, distance, -jnp.inf), axis=-1, keepdims=True)
        candidate = valid & (distance > d_max - self.retention_threshold * (d_max - d_min))
        score, index = jax.lax.top_k(jnp.where(candidate, distance, -1.0), slots)
        index = jnp.where(score >= 0, index, -1).astype(jnp.int32)
        gather = jnp.maximum(index, 0)[..., None]
        kept = jnp.stack([jnp.take_along_axis(first, gather, axis=3), jnp.take_along_axis(second, gather, axis=3)], 1)
        return MergedKV(
            direction=direction.astype(x.dtype),
            norm=jnp.stack([norm_a, norm_b], 1).astype(x.dtype),
            kept_index=index,
            kept=kept,
        )

    def compress(self, config, cache, observation, capacity):
        L, batch, heads, prompt_len, dim = cache.k.shape
        unmerged, pairs = self.layout(L)
        valid = jnp.arange(prompt_len)[None, :] < cache.lengths[:, None]
        k = jnp.where(valid[None, :, None, :, None], cache.k, 0)
        v = jnp.where(valid[None, :, None, :, None], cache.v, 0)
        slots = self.retained_slots(prompt_len)
        rows = np.array(unmerged, dtype=np.int32)
        data = MiniCacheData(
            full_k=k[rows],
            full_v=v[rows],
            keys=self._merge(k, pairs, valid, slots),
            values=self._merge(v, pairs, valid, slots),
            prompt_lengths=cache.lengths,
            tail=empty_slots(L, batch, heads, capacity - prompt_len, dim, k.dtype),
        )
        # The prompt fills all S positions of every row (padding included): `used` counts the tail's room.
        return data, jnp.full_like(cache.lengths, prompt_len)

    @staticmethod
    def _restore(merged: MergedKV, pair, side):
        """Layer (pair, side)'s vectors [B, H, S, D]: magnitudes times the merged direction, with the
        retained tokens' originals written back."""
        x = merged.direction[pair] * merged.norm[pair, side][..., None]
        index = merged.kept_index[pair]
        batch, heads, prompt_len = x.shape[:3]
        rows, cols = jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None]
        return x.at[rows, cols, jnp.where(index >= 0, index, prompt_len)].set(merged.kept[pair, side], mode="drop")

    def reconstruct(self, config, data: MiniCacheData, index):
        """The prompt keys (rotated) and values [B, H_kv, S, D] of layer `index` (int or traced)."""
        unmerged, pairs = self.layout(config.num_layers)
        is_full = np.zeros(config.num_layers, bool)
        is_full[unmerged] = True
        slot, side = np.zeros(config.num_layers, np.int32), np.zeros(config.num_layers, np.int32)
        slot[unmerged] = np.arange(len(unmerged))  # unmerged layers: their row of full_k / full_v
        for p, (a, b) in enumerate(pairs):  # merged layers: their pair and side
            slot[[a, b]], side[b] = p, 1
        slot, side = jnp.asarray(slot)[index], jnp.asarray(side)[index]

        def full():
            return data.full_k[slot], data.full_v[slot]

        def merged():
            return self._restore(data.keys, slot, side), self._restore(data.values, slot, side)

        if not pairs or not unmerged:
            return full() if not pairs else merged()
        if isinstance(index, (int, np.integer)):
            return full() if is_full[index] else merged()
        return jax.lax.cond(jnp.asarray(is_full)[index], full, merged)

    def attend(self, config, data: MiniCacheData, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        prompt_k, prompt_v = self.reconstruct(config, data, index)
        out, tail = prompt_and_tail_attention(
            config, data.tail, index, q, k, v, positions, prompt_k, prompt_v, data.prompt_lengths, window
        )
        return out, data.replace(tail=tail)
