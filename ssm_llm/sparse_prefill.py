"""The interface of a sparse prefill method: attention among a fresh prompt's tokens computed on part of the
causal mask, chosen per head from the queries and keys themselves (MInference). The attention model calls it
in place of dense causal flash attention; the methods live in `ssm_llm.kv`, which the model never imports.
"""

from __future__ import annotations

import jax

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.config import ModelConfig


class SparsePrefill:
    """Base of sparse prefill methods (subclasses are frozen dataclasses, hashable and static under jit)."""

    def check(self, config: ModelConfig) -> None:
        """Raise a ValueError naming the option if this method cannot run `config` (e.g. patterns fitted for
        another number of layers or heads); the default accepts every attention model."""

    def attend(
        self, config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, step: AttentionStep, impl: str
    ) -> jax.Array:
        """One layer's attention among the prompt's tokens: q: [B, T, H_q, D], k, v: [B, T, H_kv, D] rotated,
        at positions 0..T-1 (`step.token_counts` real tokens per row, `step.layer`, `step.window`).
        Returns [B, T, H_q, D]."""
        raise NotImplementedError
