"""TokenSelect: dynamic token-level selection of the KV cache at every decode step.

Wu et al., 2024, "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via
Dynamic Token-Level KV Cache Selection". The whole cache is kept; each decode step of each layer
attends only to a few tokens that matter to its query:

  criticality   per query head h, the dot products s_h = q_h . K_h (rotated query against the rotated
                keys of h's kv head, unscaled as in the paper) over the candidate tokens;
  soft vote     each head's scores are normalised by its own softmax and summed over all the layer's
                heads, v = sum_h softmax(s_h), so no head with large logits dominates the vote;
  selection     the `k` tokens with the largest vote form ONE selection shared by every head of the
                layer (the paper's choice: per-head selection gathers H times more K/V), and attention
                runs over those plus the first `sinks` tokens and the `local` most recent ones
                (the candidates are the tokens in between, so the three sets never overlap);
  Selection Cache  consecutive queries are similar, so the previous selection is reused while the
                cosine similarity between the current (pre-RoPE, all heads concatenated) query and the
                query that produced the selection exceeds `threshold`; below it, tokens are re-selected.
While a sequence has at most sinks + k + local tokens it attends to all of them (the paper does the
same), so with "select everything" parameters TokenSelect is exact full attention.

Parameters:
  k: tokens chosen by the vote per step and layer;
  sinks: first tokens always attended (default 128, the paper's setting);
  local: most recent tokens always attended, the current one included (default 512, the paper's);
  threshold: cosine similarity above which the Selection Cache reuses the last selection
    (default 0.9, the authors' code), in [-1, 1]; None re-selects at every step.

TokenSelect saves attention compute, not memory: `capacity` is the whole sequence and every token's
key and value stay stored (keys rotated at their positions), so `cache_bytes` is that of the full
cache plus the small per-layer selection state.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import masked_attention
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, rope_frequencies
from ssm_llm.option_spec import is_real, shown
from ssm_llm.rope import rotate


@flax.struct.dataclass
class TokenSelectCache:
    """Every token's K/V plus the Selection Cache of each layer.

    k, v: [L, B, H_kv, S, D] (slot s holds position s; keys rotated);
    selected: [L, B, k] int32 positions chosen by the last vote (-1: none);
    query: [L, B, H_q * D] float32 the pre-RoPE query that voted for `selected`;
    cached: [L, B] bool a selection is held; selections: [L, B] int32 votes run so far (the other
    decode steps past sinks + k + local tokens reused a selection).
    """

    k: jax.Array
    v: jax.Array
    selected: jax.Array
    query: jax.Array
    cached: jax.Array
    selections: jax.Array


@dataclasses.dataclass(frozen=True)
class TokenSelect(KVPolicy):
    """Per-step top-k token selection by per-head soft voting, with a Selection Cache (see the module
    docstring)."""

    k: int
    sinks: int = 128
    local: int = 512
    threshold: float | None = 0.9

    def __post_init__(self):
        check_positive_int("TokenSelect", "k", self.k)
        check_positive_int("TokenSelect", "sinks", self.sinks, minimum=0)
        check_positive_int("TokenSelect", "local", self.local, minimum=0)
        t = self.threshold
        if t is not None and (not is_real(t) or not -1 <= t <= 1):
            raise ValueError(f"TokenSelect: threshold must be None or a cosine similarity in [-1, 1], got {shown(t)}")

    @property
    def attended(self) -> int:
        """Tokens attended per step once a sequence is longer than them: sinks + k + local."""
        return self.sinks + self.k + self.local

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def compress(self, config, cache, observation, capacity):
        L, B, _, prompt_len, _ = cache.k.shape
        pad = [(0, 0)] * 3 + [(0, capacity - prompt_len), (0, 0)]
        data = TokenSelectCache(
            k=jnp.pad(cache.k, pad),
            v=jnp.pad(cache.v, pad),
            # A k past the capacity never votes (every token is attended): keep the state small.
            selected=jnp.full((L, B, min(self.k, capacity)), -1, jnp.int32),
            query=jnp.zeros((L, B, config.num_heads * config.head_dim), jnp.float32),
            cached=jnp.zeros((L, B), bool),
            selections=jnp.zeros((L, B), jnp.int32),
        )
        return data, cache.lengths

    def vote(self, q, keys, n, window):
        """The top-k positions [B, k] (-1: fewer candidates) by per-head soft voting.

        q: [B, H_q, D] rotated query at position n - 1; keys: [B, H_kv, S, D] rotated; n: [B] tokens
        including the query's own; the candidates are positions sinks <= s < n - local (and inside the
        sliding window when window > 0).
        """
        batch, heads, dim = q.shape
        kv_heads, slots = keys.shape[1], keys.shape[2]
        s = jnp.arange(slots)[None, :]
        candidate = (s >= self.sinks) & (s < (n - self.local)[:, None])
        candidate &= jnp.where(window > 0, s >= (n - window)[:, None], True)
        scores = jnp.einsum(
            "bkgd,bksd->bkgs",
            q.reshape(batch, kv_heads, heads // kv_heads, dim),
            keys,
            preferred_element_type=jnp.float32,
        )
        scores = jnp.where(candidate[:, None, None], scores, jnp.finfo(jnp.float32).min)
        votes = jax.nn.softmax(scores, axis=-1).sum(axis=(1, 2))
        best, top = jax.lax.top_k(jnp.where(candidate, votes, -jnp.inf), self.k)
        return jnp.where(jnp.isfinite(best), top, -1).astype(jnp.int32)

    def reuse(self, data: TokenSelectCache, index, query, full):
        """[B] bool: rows whose held selection serves `query: [B, H_q * D]` (pre-RoPE), by the
        Selection Cache's cosine test; never for rows still short enough (`full`) to attend to all."""
        if self.threshold is None:
            return jnp.zeros_like(full)
        old = data.query[index]
        norms = jnp.linalg.norm(query, axis=-1) * jnp.linalg.norm(old, axis=-1)
        cos = (query * old).sum(-1) / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
        return data.cached[index] & ~full & (jnp.clip(cos, -1, 1) > self.threshold)

    def attend(self, config, data: TokenSelectCache, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        if q.shape[1] != 1:
            raise ValueError(f"TokenSelect decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        batch, slots = q.shape[0], data.k.shape[3]
        p, rows = positions[:, 0], jnp.arange(batch)
        new_k = rotate(k[:, 0], p[:, None], inv_freq).astype(data.k.dtype)
        data = data.replace(
            k=data.k.at[index, rows, :, p].set(new_k), v=data.v.at[index, rows, :, p].set(v[:, 0].astype(data.v.dtype))
        )
        keys, values = data.k[index], data.v[index]
        q_rot = rotate(q, p[:, None, None], inv_freq)
        n = p + 1
        if self.attended >= slots:  # every sequence always fits: plain attention over the whole cache
            idx = jnp.broadcast_to(jnp.arange(slots), (batch, slots))
        else:
            full = n <= self.attended
            query = q[:, 0].reshape(batch, -1).astype(jnp.float32)
            vote = ~self.reuse(data, index, query, full) & ~full
            held = data.selected[index]
            fresh = jax.lax.cond(vote.any(), lambda: self.vote(q_rot[:, 0], keys, n, window), lambda: held)
            selected = jnp.where(vote[:, None], fresh, held)
            data = data.replace(
                selected=data.selected.at[index].set(selected),
                query=data.query.at[index].set(jnp.where(vote[:, None], query, data.query[index])),
                cached=data.cached.at[index].set(~full),
                selections=data.selections.at[index].add(vote.astype(jnp.int32)),
            )
            sinks = jnp.broadcast_to(jnp.arange(self.sinks), (batch, self.sinks))
            local = (n - self.local)[:, None] + jnp.arange(self.local)
            # Short rows attend to their first sinks + k + local slots, i.e. to every token; longer
            # ones have n - local > sinks + k, so sinks, selection and local window are disjoint.
            idx = jnp.where(full[:, None], jnp.arange(self.attended), jnp.concatenate([sinks, selected, local], 1))
        visible = (idx >= 0) & (idx < n[:, None]) & jnp.where(window > 0, idx > (p - window)[:, None], True)
        gather = jnp.maximum(idx, 0)[:, None, :, None]
        keys = jnp.take_along_axis(keys, gather, axis=2)
        values = jnp.take_along_axis(values, gather, axis=2)
        return masked_attention(q_rot, keys, values, visible[:, None, :]), data
