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

from pallas_kernels import cpu_fwht


def fwht(x):
    """x: [..., n] (n a power of two) -> x @ H_n / sqrt(n) in float32 (apply twice to get x back). On one CPU
    device through the compiled kernel (`pallas_kernels.cpu_fwht`: one pass instead of XLA's one per stage),
    bit-identical to `fwht_reference`."""
    n = _check_length(x)
    if n > 1 and cpu_fwht.runs_here():
        return cpu_fwht.block_fwht(jnp.asarray(x).astype(jnp.float32), n)
    return fwht_reference(x)


def _check_length(x) -> int:
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the transformed axis must have a power-of-two length, got {n}")
    return n


def fwht_reference(x):
    """`fwht` in jnp: log2(n) butterfly stages."""
    n = _check_length(x)
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:  # stage h: every pair (j, j + h) inside blocks of 2h becomes (a + b, a - b)
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / n**0.5)


def hadamard_block(n: int) -> int:
    """The Hadamard block size used for an axis of n channels: the largest power of two dividing n."""
    if n < 1:
        raise ValueError(f"hadamard_block: n must be positive, got {n}")
    return n & -n


def block_hadamard(x, axis: int = -1):
    """x Q along `axis`, Q the block-diagonal matrix of normalized Hadamard blocks of size
    `hadamard_block(n)` (the whole axis when n is a power of two; identity for odd n): symmetric and
    orthogonal, so applying it twice gives x back. Float32 result."""
    x = jnp.moveaxis(jnp.asarray(x), axis, -1)
    n = x.shape[-1]
    block = hadamard_block(n)
    y = x.astype(jnp.float32) if block == 1 else fwht(x.reshape(*x.shape[:-1], n // block, block)).reshape(x.shape)
    return jnp.moveaxis(y, -1, axis)
