"""Exact constrained sampling by rejection (AWRS: Lipkin et al., 2025, "Fast Controlled Generation from Language
Models with Adaptive Weighted Rejection Sampling"), its sampler without the SMC weights.

Sampling token after token without replacement from the model's distribution, and keeping the first one the
constraint accepts, draws exactly from the distribution renormalised over the allowed tokens: the masked
softmax. By the Gumbel-top-k trick, the order of sampling without replacement is the order of the perturbed
logits `logits / temperature + Gumbel noise` (greedy: the logits), so the device hands the host the best
`CANDIDATES` of them and the host checks them in turn, one token each. The noise is the one
`jax.random.categorical` draws with the same key, so with the same seed the tokens are the ones masking draws
(up to floating-point differences between two compiled programs; single-token checks follow llguidance's
masks, see `Matchers.allows`).
If every candidate is refused, the whole mask is computed and the best allowed perturbed logit is taken: the
same draw, at a mask's cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.sampling import Sampling

# Candidates fetched per row and step before falling back to the full mask. A trained model puts its first
# allowed token within a few ranks almost always (experiments/constrained_eval.py reports the fallbacks);
# top-16 of 49k logits costs well under a millisecond on CPU.
CANDIDATES = 16


def perturbed_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """[B, V] float32 scores whose argmax over any set of tokens is a draw from the model's law restricted to
    that set: the logits / temperature plus the Gumbel noise `jax.random.categorical(key, ...)` adds (the
    logits themselves when greedy). Only temperature may shape the law (no top-k / top-p / min-p)."""
    if sampling.greedy:
        return logits.astype(jnp.float32)
    scaled = sampling.filter(logits)
    return jax.random.gumbel(key, scaled.shape, jnp.float32) + scaled


def candidates(scores: jax.Array, count: int = CANDIDATES) -> jax.Array:
    """[B, count] int32: each row's best `count` tokens by `scores`, best first."""
    return jax.lax.top_k(scores, min(count, scores.shape[-1]))[1].astype(jnp.int32)


def propose(logits: jax.Array, key: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
    """A step's device side: (the perturbed logits [B, V] of `logits` [B, V] with `key`, their `CANDIDATES`
    best tokens [B, K])."""
    scores = perturbed_logits(logits, key, sampling)
    return scores, candidates(scores)


def choose(matchers, scores: jax.Array, best: np.ndarray, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's draw ([B] int32, -1 for rows `done` or ended): the first of its candidates `best` [B, K] its
    grammar accepts, else the best-scoring allowed token by the full mask (`scores` [B, V] read back for that
    row). Also [B] bool: rows that ended instead, their text complete with nothing allowed after it (no EOS id)."""
    out = np.full(len(best), -1, np.int32)
    ended = np.zeros(len(best), bool)
    for row in np.flatnonzero(~done):
        out[row], ended[row] = choose_row(matchers, row, best[row], lambda row=row: scores[row])
    return out, ended


def choose_row(matchers, row: int, best: np.ndarray, scores) -> tuple[int, bool]:
    """`choose` for one row in its grammar's current state: (the first of the candidates `best` [K] allowed, else
    the best-scoring allowed token by the full mask, `scores()` giving that row's [V] scores; -1 when the row
    ended, its text complete with nothing allowed after it) and whether it ended."""
    for token in best.tolist():
        if matchers.allows(row, token):
            return token, False
    allowed = matchers.row_mask(row, complete_ok=True)
    if not allowed.any():
        return -1, True
    return int(np.argmax(np.where(allowed, np.asarray(scores()), -np.inf))), False
