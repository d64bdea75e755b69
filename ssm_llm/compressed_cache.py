"""The compressed attention cache and the interface a KV-compression policy implements.

The attention model runs every decode step through this interface; the methods themselves (SnapKV,
StreamingLLM, KIVI, ...) live in `ssm_llm.kv`, an extension the model never imports:

    dense prefill (full attention over the prompt, `KVCache`)
      -> policy.compress(...)   the method's own arrays (`CompressedCache.data`), sized `capacity`
      -> per decode step and layer: policy.attend(...)  writes the new tokens, attends, returns the data
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax

from ssm_llm.cache import KVCache
from ssm_llm.config import ModelConfig


@flax.struct.dataclass
class PrefillObservation:
    """What query-aware methods (SnapKV, PyramidKV, mixed precision) see of the prompt.

    queries: [L, B, W, H_q, D] the rotated queries of each sequence's last W prompt tokens;
    positions: [B, W] their positions (-1 where a prompt has fewer than W tokens).
    """

    queries: jax.Array
    positions: jax.Array


@flax.struct.dataclass
class CompressedCache:
    """A compressed attention cache: the method's arrays plus per-sequence counters.

    data: the policy's pytree (per-layer arrays carry a leading layer axis);
    lengths: [B] tokens seen so far (the next token's original position);
    used: [B] slots holding a token (tokens seen, minus those evicted);
    policy, capacity (static): the method and the number of token slots per sequence.
    """

    data: Any
    lengths: jax.Array
    used: jax.Array
    policy: Any = flax.struct.field(pytree_node=False)
    capacity: int = flax.struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


@flax.struct.dataclass
class AttentionStep:
    """Where one forward step's new tokens go, as one layer's attention sees them.

    positions: [B, T] the new tokens' original positions; lengths: [B] tokens per row after the step;
    token_counts: [B] real tokens among the T (the rest is right padding); used: [B] cache slots in use
    before the step (a dense cache: `lengths`); cos, sin: [B, T, D // 2] rotary tables at `positions`;
    layer: the layer index (traced under scan); window: its sliding window (0: none).
    """

    positions: jax.Array
    lengths: jax.Array
    token_counts: jax.Array
    used: jax.Array
    cos: jax.Array
    sin: jax.Array
    layer: jax.Array | int = 0
    window: jax.Array | int = 0


class KVPolicy:
    """Base of every compression method (subclasses are frozen dataclasses, hashable and static under jit).

    Subclasses implement `capacity`, `compress` and `attend`; the defaults below say "no query
    observation needed" and "bounded by the model's context".
    """

    observation_window: int = 0  # how many last prompt queries `compress` needs (0: none)

    @property
    def unbounded(self) -> bool:
        """True if generation may run past the model's context (it re-uses cache positions)."""
        return False

    def check(self, config: ModelConfig, prompt_lengths: Sequence[int]) -> None:
        """Raise a ValueError naming the option if this policy cannot serve `config` with prompts of
        `prompt_lengths` tokens (each row's length where known, else the padded length). `compress_cache`
        and `ssm_llm.kv.prefill` call it before any array is built; the default accepts everything."""

    def work_bytes(self, config: ModelConfig, batch: int, prompt_len: int, max_len: int) -> int:
        """Bytes the prefill and `compress` need besides the dense prefill cache and `capacity` dense slots
        (observed queries, factorizations, side tables); counted by the memory check before a prefill."""
        return 0

    def capacity(self, prompt_len: int, max_len: int) -> int:
        """Token slots per sequence after a prefill into a dense cache of `prompt_len` positions, for
        sequences reaching `max_len` positions (so a row may decode `max_len - prompt_len` tokens even
        when its prompt is shorter than `prompt_len`: `used` must count slots so that
        `advance(used) <= capacity` guarantees room)."""
        raise NotImplementedError

    def compress(
        self, config: ModelConfig, cache: KVCache, observation: PrefillObservation | None, capacity: int
    ) -> tuple[Any, jax.Array]:
        """(data, used [B]): the compressed form of a dense prefill cache (`cache.lengths` tokens per
        sequence, keys rotated at their positions) and the slots it fills."""
        raise NotImplementedError

    def attend(
        self, config: ModelConfig, data: Any, step: AttentionStep, q: jax.Array, k: jax.Array, v: jax.Array, impl: str
    ) -> tuple[jax.Array, Any]:
        """One layer's attention of the step's new tokens, with their keys/values written into `data`.

        q: [B, T, H_q, D], k, v: [B, T, H_kv, D] *before* RoPE; `step` says where they go (positions,
        slots used, lengths after the step, the layer and its window).
        Returns (attention output [B, T, H_q, D], new data).
        """
        raise NotImplementedError

    def advance(self, used: jax.Array, counts: jax.Array, capacity: int) -> jax.Array:
        """Slots in use after `counts: [B]` new tokens (a ring buffer caps this at `capacity`)."""
        return used + counts
