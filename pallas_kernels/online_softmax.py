"""The online-softmax step shared by the attention kernels (flash attention, split-K cache attention).

Attention over keys seen one block at a time keeps, per query row, the running max `m`, the running
sum of exp(score - m) `l`, and the unnormalised output `acc`; each new block rescales them by
exp(m_old - m_new). Masked scores use a finite "minus infinity" so a row that has seen no key yet
keeps m = NEG and l = 0 (exp(NEG - NEG) is masked to 0), never NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG = -1e30


def online_softmax_step(acc, m, l, scores, visible, v):
    """One key block. acc: [R, D] f32; m, l: [R] f32; scores: [R, K] f32; visible: [R, K] bool;
    v: [K, D]. Returns the updated (acc, m, l)."""
    scores = jnp.where(visible, scores, NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)


def initial_state(rows: int, dim: int):
    """(acc, m, l) before any key block."""
    return (jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
