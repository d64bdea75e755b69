"""MInference's offline, kernel-aware pattern search: for every head, the pattern whose online estimate keeps
the most of the full attention.

The paper runs each candidate pattern, with its budget, on a long sample and keeps for each head the one whose
sparse attention recalls the most of the dense attention's weight. Here every candidate gets the same budget
(`blocks` key blocks + `columns` columns per query block, so the same attention work), its indices are estimated
exactly as `MInference.attend` estimates them, and its recall is the dense softmax weight inside its mask,
averaged over the sample's queries.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ssm_llm.cache import init_cache
from ssm_llm.config import ModelConfig
from ssm_llm.kv.minference import (
    PATTERNS,
    MInference,
    a_shape_indices,
    block_sparse_indices,
    vertical_slash_indices,
)
from ssm_llm.models import attention_lm

QUERY_BLOCKS_PER_STEP = 8  # dense probabilities of 8 x 64 queries x T keys x H heads at a time (151 MB at 8k)


def pattern_mask(blocks, columns, n_keys: int, block: int):
    """The keys each query block may see under a pattern: [H, N, n_keys] bool from blocks [H, N, K] and
    columns [H, C] (-1: none); the causal mask is not applied."""
    heads, n_blocks, _ = blocks.shape
    key_block = jnp.arange(n_keys) // block
    listed = jnp.zeros((heads, n_blocks, n_blocks + 1), bool)
    listed = listed.at[jnp.arange(heads)[:, None, None], jnp.arange(n_blocks)[None, :, None], blocks].set(True)
    mask = listed[:, :, key_block]  # -1 entries set the spare last column, never read
    in_columns = jnp.zeros((heads, n_keys + 1), bool).at[jnp.arange(heads)[:, None], columns].set(True)[:, :n_keys]
    return mask | in_columns[:, None, :]


@functools.partial(jax.jit, static_argnames=("settings", "scored"))
def layer_recalls(q, k, settings: MInference, scored: int | None = None):
    """Recall [H, len(PATTERNS)] of every pattern for one layer and one unpadded sequence: q [T, H, D], k [T,
    H_kv, D] rotated. Recall = the dense causal softmax weight inside the pattern's mask, averaged over the last
    `scored` queries (None: all)."""
    steps, heads, dim = q.shape
    kv_heads = k.shape[1]
    block = settings.block
    n_blocks = -(-steps // block)
    counts = jnp.array([steps], jnp.int32)
    width = min(settings.blocks, n_blocks)
    n_columns = min(settings.columns, steps)
    qb, kb = q[None], k[None]
    candidates = [
        a_shape_indices(1, heads, steps, block, width, n_columns),
        vertical_slash_indices(qb, kb, counts, block, width, n_columns, settings.last_queries),
        (block_sparse_indices(qb, kb, counts, block, width), jnp.full((1, heads, 0), -1, jnp.int32)),
    ]
    masks = jnp.stack([pattern_mask(b[0], c[0], steps, block) for b, c in candidates])  # [P, H, N, T]
    per_step = QUERY_BLOCKS_PER_STEP
    n_steps = -(-n_blocks // per_step)
    padded = n_steps * per_step * block
    qp = jnp.pad(q, ((0, padded - steps), (0, 0), (0, 0))).reshape(padded, kv_heads, heads // kv_heads, dim)
    masks = jnp.pad(masks, ((0, 0), (0, 0), (0, n_steps * per_step - n_blocks), (0, 0)))

    def one(i):
        rows = i * per_step * block + jnp.arange(per_step * block)
        qs = jax.lax.dynamic_slice_in_dim(qp, i * per_step * block, per_step * block)
        scores = jnp.einsum("tkgd,skd->kgts", qs, k, preferred_element_type=jnp.float32).reshape(heads, -1, steps)
        causal = jnp.arange(steps)[None, :] <= rows[:, None]
        probs = jax.nn.softmax(jnp.where(causal, scores * dim**-0.5, -jnp.inf), axis=-1)
        mask = jax.lax.dynamic_slice_in_dim(masks, i * per_step, per_step, 2)  # [P, H, per_step, T]
        mask = jnp.repeat(mask, block, axis=2)  # [P, H, rows, T]
        kept = jnp.sum(jnp.where(mask, probs[None], 0.0), axis=-1)  # [P, H, rows]
        return jnp.sum(jnp.where((rows < steps) & (rows >= first), kept, 0.0), axis=-1)  # [P, H]

    first = 0 if scored is None else max(0, steps - scored)
    total = jnp.sum(jax.lax.map(one, jnp.arange(n_steps)), axis=0)
    return (total / (steps - first)).T


@functools.partial(jax.jit, static_argnames=("config",))
def _queries_and_keys(params, config, tokens):
    cache = init_cache(config, 1, tokens.shape[1], params["embed"].dtype)
    counts = jnp.array([tokens.shape[1]], jnp.int32)
    _, cache, observation = attention_lm.prefill_observed(params, config, tokens, cache, counts, tokens.shape[1])
    return observation.queries[:, 0], cache.k[:, 0].transpose(0, 2, 1, 3)  # [L, T, H, D], [L, T, H_kv, D]


def fit_patterns(
    params: dict,
    config: ModelConfig,
    tokens,
    settings: MInference | None = None,
    *,
    min_recall: float | None = None,
    scored: int | None = None,
    progress: bool = True,
) -> tuple[MInference, np.ndarray]:
    """MInference's offline search on one sample `tokens` (a list of ids, ideally as long as the prompts it will
    serve): returns `settings` (default `MInference()`) with each head's best pattern, and the recalls
    [L, H, len(PATTERNS)].
    `min_recall`: layers whose heads' best recalls average below it keep dense attention (`dense_layers`).
    `scored`: the recall is averaged over the sample's last `scored` queries only (None: all of them), the
    queries of a long prompt that see most of it (and the ones the answer is read from)."""
    settings = MInference() if settings is None else settings
    tokens = jnp.asarray([list(tokens)], jnp.int32)
    queries, keys = _queries_and_keys(params, config, tokens)
    recalls = np.stack(
        [
            np.asarray(layer_recalls(queries[layer], keys[layer], settings, scored))
            for layer in tqdm(range(config.num_layers), desc="MInference pattern search", disable=not progress)
        ]
    )
    patterns = tuple(tuple(PATTERNS[i] for i in layer.argmax(-1)) for layer in recalls)
    dense = () if min_recall is None else tuple(int(i) for i in np.flatnonzero(recalls.max(-1).mean(-1) < min_recall))
    return dataclasses.replace(settings, patterns=patterns, dense_layers=dense), recalls
