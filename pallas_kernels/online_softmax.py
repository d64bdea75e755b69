"""The online-softmax step shared by the attention kernels (flash attention, split-K cache attention).

Attention over keys seen one block at a time keeps, per query row, the running max `m`, the running
sum of exp(score - m) `denom` (the softmax denominator), and the unnormalised output `acc`; each new
block rescales them by exp(m_old - m_new). Masked scores use a finite "minus infinity" so a row that has
seen no key yet keeps m = NEG and denom = 0 (exp(NEG - NEG) is masked to 0), never NaN. The GPU kernels
carry (acc, m, denom)
as loop values; the TPU kernels keep them in VMEM scratch across the "arbitrary" key-block grid axis.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG = -1e30


def online_softmax_step(acc, m, denom, scores, visible, v):
    """One key block. acc: [R, D] f32; m, denom: [R] f32; scores: [R, K] f32; visible: [R, K] bool;
    v: [K, D]. Returns the updated (acc, m, denom)."""
    scores = jnp.where(visible, scores, NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, denom * alpha + jnp.sum(p, axis=1)


def initial_state(rows: int, dim: int):
    """(acc, m, denom) before any key block."""
    return (jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))


def scratch_init(m_ref, denom_ref, acc_ref):
    """The TPU kernels' scratch before any key block: m, denom [R, W] (W lanes, each holding the row's
    value) and acc [R, D], all float32."""
    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    denom_ref[...] = jnp.zeros(denom_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def scratch_step(m_ref, denom_ref, scores, visible):
    """One key block of a TPU kernel: updates the m and denom scratch from scores, visible [R, K]; returns
    p [R, K] float32 (zero where not visible) and alpha [R, 1], with which the caller updates
    acc <- acc * alpha + p @ v."""
    scores = jnp.where(visible, scores, NEG)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(scores - m_new[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    denom_ref[...] = alpha * denom_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    return p, alpha[:, :1]


def scratch_output(denom_ref, acc_ref):
    """The normalised output [R, D] float32 of a TPU kernel's scratch; a row that saw no key is zero."""
    denom = denom_ref[...][:, :1]
    return acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
