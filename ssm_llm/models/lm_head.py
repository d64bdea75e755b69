"""Pieces every model family shares: biased linear layers and the output projection to the vocabulary."""

from __future__ import annotations

import jax


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """`x: [..., in] @ w: [in, out] (+ b: [out])`."""
    y = x @ w
    return y if b is None else y + b


def logits_from_hidden(params: dict, config, h: jax.Array) -> jax.Array:
    """Project final hidden states `[..., H]` to vocabulary logits `[..., V]` (tied: the embedding)."""
    if config.tie_word_embeddings:
        return h @ params["embed"].T
    return h @ params["lm_head"]
