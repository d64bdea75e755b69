"""Pieces every model family shares: biased linear layers and the output projection to the vocabulary."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# On CPU, up to this many rows (batch x tokens), tied logits are computed as `embed @ h.T` ([V, rows])
# and transposed back: XLA then streams the [V, H] embedding once like a matrix-vector product instead
# of packing it for a GEMM. Measured on SmolLM2 (576 x 49152, 2-core CPU): 1.7-1.9x faster for 2-16
# rows, equal at 1 row, slower from ~128 rows (prefill) on. Other backends keep `h @ embed.T`.
SMALL_ROWS = 32


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """`x: [..., in] @ w: [in, out] (+ b: [out])`."""
    y = x @ w
    return y if b is None else y + b


def logits_from_hidden(params: dict, config, h: jax.Array) -> jax.Array:
    """Project final hidden states `[..., H]` to vocabulary logits `[..., V]` (tied: the embedding)."""
    if config.tie_word_embeddings:
        if math.prod(h.shape[:-1]) <= SMALL_ROWS and jax.default_backend() == "cpu":
            return jnp.moveaxis(jnp.einsum("vh,...h->v...", params["embed"], h), 0, -1)
        return h @ params["embed"].T
    return h @ params["lm_head"]
