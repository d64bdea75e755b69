"""RMSNorm, computed in float32 as Hugging Face's `LlamaRMSNorm` does."""

import jax
import jax.numpy as jnp


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """`x: [..., H]`, `weight: [H]` -> `[..., H]` in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean_square = halving_sum(x32 * x32)[..., None] / x.shape[-1]
    normed = x32 * jax.lax.rsqrt(mean_square + eps)
    return weight * normed.astype(x.dtype)


def halving_sum(x: jnp.ndarray) -> jnp.ndarray:
    """`x: [..., n]` -> `[...]`: the sum over the last axis as a fixed tree of elementwise additions (zero-padded to
    a power of two, then halved: first half + second half). Every row gets the same additions whatever the number
    of rows, unlike XLA's CPU reductions, whose order changes with the shape (a row summed among 8 rows differed in
    the last bit from the same row alone). So a draft-tree node's norm matches the same token decoded alone."""
    n = x.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]
