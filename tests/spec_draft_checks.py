"""Shared pieces of the draft-model drafter tests (DraftModel, RSD, DySpec): peaked tiny models, a ragged
batch of committed contexts, jitted propose/update, and the plain-forward reference distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from spec_checks import LLAMA, MAMBA2, wide_params

import ssm_llm
from ssm_llm.sampling import Sampling
from ssm_llm.speculative.protocol import DraftContext

__all__ = [
    "LLAMA",
    "MAMBA2",
    "PROMPTS",
    "ROOTS",
    "MAX_LEN",
    "peaked_params",
    "prompt_batch",
    "context",
    "propose",
    "update",
    "path_logits",
    "draft_law",
    "GREEDY",
    "sampled",
]

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
ROOTS = [13, 14, 15]  # each row's first generated token: the root of the first tree, not yet in any cache
MAX_LEN = 32
GREEDY = Sampling(temperature=jnp.float32(1.0), greedy=True)


def sampled(temperature: float = 1.0) -> Sampling:
    return Sampling(temperature=jnp.float32(temperature), greedy=False)


def peaked_params(config, seed: int = 0, head_scale: float = 5.0):
    """Wide random params with a sharpened LM head: draft laws with a few likely tokens (a tree grown by
    probability then has depth, and greedy choices are far from ties)."""
    params = wide_params(config, seed=seed)
    return {**params, "lm_head": params["lm_head"] * head_scale}


def prompt_batch(prompts, width: int = 12):
    """(tokens [B, width] right-padded, lengths [B]) as jnp arrays (one width: one prefill compile)."""
    tokens = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def context(committed, active=None) -> DraftContext:
    """A DraftContext whose rows hold `committed` (prompt, generated tokens, the root last)."""
    history = np.zeros((len(committed), MAX_LEN + 16), np.int32)
    for b, seq in enumerate(committed):
        history[b, : len(seq)] = seq
    active = np.ones(len(committed), bool) if active is None else np.asarray(active)
    return DraftContext(jnp.asarray(history), jnp.asarray([len(s) for s in committed], jnp.int32), jnp.asarray(active))


# Module-level jits with the drafter as an argument: what the speculative loop does, and one compile per
# drafter configuration and shapes across tests.
propose = jax.jit(lambda drafter, state, ctx, sampling, key: drafter.propose(state, ctx, sampling, key))
update = jax.jit(lambda drafter, state, ctx, tree, acceptance: drafter.update(state, ctx, tree, None, acceptance))


def path_logits(params, config, sequences, width: int = 16) -> np.ndarray:
    """[M, V] float64: plain-forward logits after each token sequence (no tree code involved)."""
    rows = -(-len(sequences) // 32) * 32  # a few batch sizes: a few compiles
    tokens = np.zeros((rows, width), np.int32)
    counts = np.ones(rows, np.int32)
    for m, seq in enumerate(sequences):
        tokens[m, : len(seq)] = seq
        counts[m] = len(seq)
    logits, _ = ssm_llm.forward(
        params, config, jnp.asarray(tokens), ssm_llm.init_cache(config, rows, width), token_counts=jnp.asarray(counts)
    )
    return np.asarray(logits, np.float64)[np.arange(len(sequences)), counts[: len(sequences)] - 1]


def draft_law(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of `logits / temperature` over the last axis, float64."""
    z = logits / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
