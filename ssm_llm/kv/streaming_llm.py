"""StreamingLLM: attention sinks plus a recent window, in a fixed-size ring buffer.

Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks": keeping the first few
tokens (the "attention sinks" that soak up attention mass) and a window of the most recent tokens lets
a model generate far past its cache size. Parameters:
  budget: slots per sequence (sinks + window);  sinks: first tokens kept forever (default 4);
  positions: "cache" (the paper: a key's position is its rank inside the cache, so distances never
    exceed the budget and generation can run past the model's context) or "original" (every token
    keeps its position in the text, as kvpress does);
  distance_ceiling: LM-Infinite's Λ-shaped attention (Han et al., 2023, "LM-Infinite: Zero-Shot
    Extreme Length Generalization for Large Language Models"): relative distances are capped at this
    value, so sinks and far keys look at most `distance_ceiling` tokens away.
With positions="cache" or a ceiling, keys are stored before RoPE and rotated at attention time.
Bounds checked against the model (`check`): budget <= the context (a larger ring never fills within
it, and with positions="cache" its ranks would pass the trained positions) and distance_ceiling < the
context (a larger cap would let distances pass the trained ones before it binds). The cache holds
`budget` slots per sequence and layer, whatever the prompt length and max_len.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, check_within_context, rope_frequencies
from ssm_llm.kv.slots import SlotKV, gather_slots, slot_attention, write_slot
from ssm_llm.rope import rotate

POSITIONS = ("cache", "original")


@dataclasses.dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """Sinks + recent-window eviction (see the module docstring)."""

    budget: int
    sinks: int = 4
    positions: str = "cache"
    distance_ceiling: int | None = None

    def __post_init__(self):
        check_positive_int("StreamingLLM", "budget", self.budget)
        check_positive_int("StreamingLLM", "sinks", self.sinks, minimum=0)
        if self.sinks >= self.budget:
            raise ValueError(
                f"StreamingLLM: sinks ({self.sinks}) must be smaller than budget ({self.budget}), "
                f"leaving room for a recent window"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"StreamingLLM: positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.distance_ceiling is not None:
            check_positive_int("StreamingLLM", "distance_ceiling", self.distance_ceiling)

    @property
    def window(self) -> int:
        return self.budget - self.sinks

    @property
    def unbounded(self) -> bool:
        return self.positions == "cache" or self.distance_ceiling is not None

    @property
    def pre_rope(self) -> bool:
        """Keys are stored un-rotated (rotated per step at their cache / capped positions)."""
        return self.unbounded

    def check(self, config, prompt_lengths):
        check_within_context(
            "StreamingLLM",
            "budget",
            self.budget,
            config,
            "a ring that large never fills within it, and its keys would sit at positions the model was not trained on",
        )
        context = config.max_position_embeddings
        if self.distance_ceiling is not None and self.distance_ceiling >= context:
            raise ValueError(
                f"StreamingLLM: distance_ceiling ({self.distance_ceiling}) must be below the model's "
                f"context of {context} positions: a larger cap lets attention distances pass the "
                f"trained ones before it binds"
            )

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return self.budget

    def slot_of(self, position):
        """The ring slot of a token at `position`: sinks first, then the window in rotation."""
        return jnp.where(position < self.sinks, position, self.sinks + (position - self.sinks) % self.window)

    def kept_positions(self, lengths, capacity):
        """[B, capacity]: the position held by each slot after `lengths: [B]` tokens (-1: empty)."""
        j = jnp.arange(capacity)[None, :]
        last = lengths[:, None] - 1
        ring = last - (last - j) % self.window  # the latest position that maps onto window slot j
        pos = jnp.where(j < self.sinks, j, ring)
        return jnp.where((pos >= j) & (pos <= last), pos, -1).astype(jnp.int32)

    def compress(self, config, cache, observation, capacity):
        keep = self.kept_positions(cache.lengths, capacity)
        L, _, kv_heads = cache.k.shape[:3]
        keep = jnp.broadcast_to(keep[None, :, None, :], (L, keep.shape[0], kv_heads, capacity))
        slots = gather_slots(cache, keep, capacity)
        if self.pre_rope:
            unrotated = rotate(slots.k, -jnp.maximum(slots.pos, 0), rope_frequencies(config))
            slots = slots.replace(k=unrotated)
        return slots, jnp.minimum(cache.lengths, capacity)

    def rotary_positions(self, pos, q_pos):
        """Positions at which keys (pos: [B, H_kv, S]) and the query (q_pos: [B]) are rotated."""
        if self.positions == "cache":
            start = jnp.maximum(self.sinks, q_pos + 1 - self.window)[:, None, None]  # oldest window token
            pos = jnp.where(pos < self.sinks, pos, self.sinks + pos - start)
            q_pos = jnp.where(q_pos < self.sinks, q_pos, self.sinks + q_pos - start[:, 0, 0])
        if self.distance_ceiling is not None:
            pos = q_pos[:, None, None] - jnp.minimum(q_pos[:, None, None] - pos, self.distance_ceiling)
        return pos, q_pos

    def attend(self, config, data: SlotKV, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        if q.shape[1] != 1:
            raise ValueError(f"StreamingLLM decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        p = positions[:, 0]
        new_k = k[:, 0] if self.pre_rope else rotate(k[:, 0], p[:, None], inv_freq)
        data = write_slot(data, index, self.slot_of(p), new_k, v[:, 0], p)
        keys, pos = data.k[index], data.pos[index]
        if self.pre_rope:
            key_pos, q_pos = self.rotary_positions(pos, p)
            keys = rotate(keys, jnp.maximum(key_pos, 0), inv_freq)
        else:
            q_pos = p
        q = rotate(q, q_pos[:, None, None], inv_freq)
        return slot_attention(q, keys, data.v[index], pos, positions, window), data

    def advance(self, used, counts, capacity):
        return jnp.minimum(used + counts, capacity)
