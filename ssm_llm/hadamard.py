"""The fast Walsh-Hadamard transform: an orthogonal rotation that spreads outlier channels.

Multiplying a vector of n = 2^m channels by the normalized Hadamard matrix H_n / sqrt(n) (Sylvester's
construction, H_2n = [[H_n, H_n], [H_n, -H_n]]) mixes every channel into every output with equal
weight, so one large channel no longer sets the quantization range of a whole group. The matrix is
symmetric and orthogonal, so the transform is its own inverse; the butterfly below costs
O(n log n) instead of a matmul's O(n^2). RotateKV (Su et al., 2025) and QuaRot (Ashkboos et al., 2024)
rotate K/V this way before low-bit quantization. A core module: `ssm_llm.kv` (RotateKV) and
`ssm_llm.quant` (Quamba's rotations) both use it.
"""

from __future__ import annotations

import jax.numpy as jnp


def fwht(x):
    """x: [..., n] (n a power of two) -> x @ H_n / sqrt(n) in float32 (apply twice to get x back)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the transformed axis must have a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:  # stage h: every pair (j, j + h) inside blocks of 2h becomes (a + b, a - b)
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / n**0.5)
