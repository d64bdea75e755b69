"""InfLLM: block memory units retrieved per decode step, beside the attention sinks and a local window.

Xiao et al., 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context
Memory". The whole cache stays reachable; each decode step of each layer attends to the first `sinks`
tokens, the `local` most recent ones and the `blocks` memory units most relevant to its query:

  memory units      the tokens between the sinks and the local window, cut into blocks of `block_size`
                    (block i holds positions sinks + i * block_size ...); a block becomes a unit once its
                    last token has left the local window;
  representatives   per query head h, each token m is scored by the attention logits it receives from the
                    `local` queries after it, r_m = sum_{j=1..local} q_{m+j} . k_m (the paper's formula;
                    the prompt's scores come from all its queries, later ones accumulate per step); a unit
                    is represented, per head, by the mean of its `representatives` best-scored keys;
  lookup            relevance of unit u to the query: sum over heads of q_h . (the mean of u's
                    representatives for h), with the query rotated by the angle of position `local` and the
                    representative keys unrotated (the authors' code: every memory token at the same
                    distance, so the lookup compares content, not positions); the top `blocks` units, ONE
                    choice per layer shared by its heads, are attended in full, together with the sinks, the
                    local window and the tokens of the block still filling behind it.
While a sequence has at most sinks + blocks * block_size + local + block_size tokens it attends to all of
them, so with "retrieve everything" parameters InfLLM is exact full attention.

Attention itself sees keys at their positions in the text (rotated once, as in the full cache). The paper
also attends to memory tokens at that one distance, for lengths beyond the training context; here the cache
is bounded by the model's context, so distances stay trained ones. InfLLM keeps every token's K/V (the paper
offloads units to host memory; on a CPU there is no other memory): it saves attention work, not bytes.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import masked_attention
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, rope_frequencies
from ssm_llm.rope import rotate


@flax.struct.dataclass
class InfLLMCache:
    """Every token's K/V, its representative scores and each unit's representative keys.

    k, v: [L, B, H_kv, S, D] (slot s holds position s; keys rotated);
    scores: [L, B, H_q, S] float32 r_m per query head so far; units: [L, B, H_q, U, D] float32 the mean of
    each block's representative keys per query head, unrotated (valid for complete blocks only).
    """

    k: jax.Array
    v: jax.Array
    scores: jax.Array
    units: jax.Array


@dataclasses.dataclass(frozen=True)
class InfLLM(KVPolicy):
    """Sinks + top-k memory units (blocks found through representative tokens) + a local window (see the
    module docstring). block_size: tokens per unit (paper: 128); blocks: units attended per step;
    representatives: tokens representing a unit (paper: 4); sinks: the paper's initial tokens (128);
    local: the local window, also the span of queries that scores a token."""

    blocks: int
    block_size: int = 128
    representatives: int = 4
    sinks: int = 128
    local: int = 512

    def __post_init__(self):
        for name in ("blocks", "block_size", "representatives", "local"):
            check_positive_int("InfLLM", name, getattr(self, name))
        check_positive_int("InfLLM", "sinks", self.sinks, minimum=0)
        if self.representatives > self.block_size:
            raise ValueError(
                f"InfLLM: representatives ({self.representatives}) must not exceed block_size ({self.block_size})"
            )

    @property
    def observation_window(self) -> int:
        """Every prompt query scores the tokens before it: the whole prompt is observed."""
        return 1 << 30

    @property
    def attended(self) -> int:
        """Tokens attended per step at most: sinks, the retrieved units, the local window and the block
        filling behind it."""
        return self.sinks + self.blocks * self.block_size + self.local + self.block_size

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def num_units(self, capacity: int) -> int:
        return max(1, -(-(capacity - self.sinks) // self.block_size))

    def compress(self, config, cache, observation, capacity):
        L, B, kv_heads, prompt_len, dim = cache.k.shape
        pad = [(0, 0)] * 3 + [(0, capacity - prompt_len), (0, 0)]
        k, v = jnp.pad(cache.k, pad), jnp.pad(cache.v, pad)
        scores = jnp.pad(self.prompt_scores(cache.k, observation), pad[:-1])
        inv_freq = rope_frequencies(config)
        units = jax.vmap(lambda keys, s: self.unit_keys(keys, s, inv_freq))(k, scores)  # incomplete: never looked up
        return InfLLMCache(k=k, v=v, scores=scores, units=units), cache.lengths

    def prompt_scores(self, keys, observation):
        """r_m [L, B, H_q, S] of the prompt's tokens from its queries: q_{m+1} ... q_{m+local} (those there
        are) summed per head through a running sum, dotted with k_m; one layer at a time (the running sums
        are as large as the observed queries)."""
        positions = observation.positions  # [B, W]; slot w holds position w - (W - n_b) (right-aligned)
        W = positions.shape[1]
        seq = keys.shape[3]
        # The queries after m are slots m + 1 + shift ... m + local + shift (clipped), with shift = W - n_b.
        shift = W - (positions[:, -1] + 1)  # [B]
        m = jnp.arange(seq)[None, :]
        first = jnp.clip(m + 1 + shift[:, None], 0, W)
        last = jnp.clip(m + self.local + 1 + shift[:, None], 0, W)

        def layer(args):
            k, q = args  # [B, H_kv, S, D], [B, W, H_q, D]
            q = jnp.where((positions >= 0)[:, :, None, None], q.astype(jnp.float32), 0.0)
            running = jnp.pad(jnp.cumsum(q, axis=1), [(0, 0), (1, 0), (0, 0), (0, 0)])  # [B, W + 1, H_q, D]
            window = jnp.take_along_axis(running, last[:, :, None, None], axis=1) - jnp.take_along_axis(
                running, first[:, :, None, None], axis=1
            )  # [B, S, H_q, D]
            batch, _, heads, dim = window.shape
            window = window.reshape(batch, seq, k.shape[1], heads // k.shape[1], dim)
            return jnp.einsum("bksd,bskgd->bkgs", k.astype(jnp.float32), window).reshape(batch, heads, seq)

        return jax.lax.map(layer, (keys, observation.queries))

    def work_bytes(self, config, batch: int, prompt_len: int, max_len: int) -> int:
        """The observed queries of every prompt token and layer, one layer's running sums, and the scores and
        unit keys kept beside the K/V."""
        per_token = batch * config.num_heads * config.head_dim * 4
        units = self.num_units(max_len) * per_token
        return (config.num_layers + 4) * prompt_len * per_token + config.num_layers * (
            batch * config.num_heads * max_len * 4 + units
        )

    def unit_keys(self, keys, scores, inv_freq):
        """Each block's representatives per query head: keys [B, H_kv, S, D] (rotated), scores [B, H_q, S]
        -> the mean of the best-scored keys, unrotated, [B, H_q, U, D]."""
        batch, kv_heads, seq, dim = keys.shape
        heads = scores.shape[1]
        units = self.num_units(seq)
        pos = self.sinks + jnp.arange(units * self.block_size)
        block_scores = jnp.where(pos < seq, jnp.take(scores, jnp.minimum(pos, seq - 1), axis=2), -jnp.inf)
        _, best = jax.lax.top_k(block_scores.reshape(batch, heads, units, self.block_size), self.representatives)
        chosen = jnp.minimum(self.sinks + jnp.arange(units)[None, None, :, None] * self.block_size + best, seq - 1)
        return (
            self.unrotated_keys(keys, chosen.reshape(batch, heads, -1), inv_freq)
            .reshape(batch, heads, units, self.representatives, dim)
            .mean(3)
        )

    @staticmethod
    def unrotated_keys(keys, chosen, inv_freq):
        """keys [B, H_kv, S, D] (rotated at their positions) at `chosen` [B, H_q, N] positions, per query
        head, rotated back to position 0: [B, H_q, N, D] float32."""
        batch, kv_heads = keys.shape[:2]
        heads = chosen.shape[1]
        grouped = chosen.reshape(batch, kv_heads, -1)  # the query heads of a kv head are adjacent
        gathered = jnp.take_along_axis(keys, grouped[..., None], axis=2).astype(jnp.float32)
        return rotate(gathered, -grouped, inv_freq).reshape(batch, heads, chosen.shape[2], keys.shape[3])

    def attend(self, config, data: InfLLMCache, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        if q.shape[1] != 1:
            raise ValueError(f"InfLLM decodes one token per step, got {q.shape[1]}")
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
            scores = self.score_local(data.scores[index], keys, q_rot[:, 0], p)
            done = jnp.maximum((n - self.local - self.sinks) // self.block_size, 0)  # complete units [B]
            units = self.update_unit(data.units[index], keys, scores, done - 1, inv_freq)
            data = data.replace(scores=data.scores.at[index].set(scores), units=data.units.at[index].set(units))
            lookup_q = rotate(q[:, 0], jnp.full((batch, 1), self.local), inv_freq).astype(jnp.float32)
            relevance = jnp.einsum("bhd,bhud->bu", lookup_q, units)
            u = jnp.arange(units.shape[2])[None, :]
            lookup = u < done[:, None]
            end = self.sinks + (u + 1) * self.block_size  # a unit wholly outside a sliding window is useless
            lookup &= jnp.where(window > 0, end > (n - window)[:, None], True)
            best, top = jax.lax.top_k(jnp.where(lookup, relevance, -jnp.inf), self.blocks)
            top = jnp.where(jnp.isfinite(best), top, -1)
            block = jnp.arange(self.block_size)
            retrieved = jnp.where(
                top[:, :, None] >= 0, self.sinks + top[:, :, None] * self.block_size + block, -1
            ).reshape(batch, -1)
            tail = (self.sinks + done * self.block_size)[:, None] + jnp.arange(self.local + self.block_size)
            sinks = jnp.broadcast_to(jnp.arange(self.sinks), (batch, self.sinks))
            full = n <= self.attended
            idx = jnp.where(full[:, None], jnp.arange(self.attended), jnp.concatenate([sinks, retrieved, tail], 1))
        visible = (idx >= 0) & (idx < n[:, None]) & jnp.where(window > 0, idx > (p - window)[:, None], True)
        gather = jnp.clip(idx, 0, slots - 1)[:, None, :, None]
        keys = jnp.take_along_axis(keys, gather, axis=2)
        values = jnp.take_along_axis(values, gather, axis=2)
        return masked_attention(q_rot, keys, values, visible[:, None, :]), data

    def score_local(self, scores, keys, q_rot, p):
        """scores [B, H_q, S] plus the logits of the query at p (rotated, [B, H_q, D]) on the `local` tokens
        before it."""
        batch, heads, dim = q_rot.shape
        kv_heads = keys.shape[1]
        m = p[:, None] - self.local + jnp.arange(self.local)[None, :]  # [B, local]
        local_keys = jnp.take_along_axis(keys, jnp.maximum(m, 0)[:, None, :, None], axis=2).astype(jnp.float32)
        grouped = q_rot.reshape(batch, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
        logits = jnp.einsum("bkgd,bkmd->bkgm", grouped, local_keys).reshape(batch, heads, self.local)
        rows = jnp.arange(batch)[:, None, None]
        target = jnp.where(m >= 0, m, scores.shape[2])[:, None, :]
        return scores.at[rows, jnp.arange(heads)[None, :, None], target].add(logits, mode="drop")

    def update_unit(self, units, keys, scores, latest, inv_freq):
        """Units [B, H_q, U, D] with unit `latest` [B] (-1: none) recomputed from its scores [B, H_q, S]: the
        last unit to complete is final once its tokens have had all their `local` queries."""
        batch, heads = scores.shape[:2]
        start = self.sinks + jnp.maximum(latest, 0) * self.block_size
        pos = jnp.minimum(start[:, None] + jnp.arange(self.block_size)[None, :], keys.shape[2] - 1)  # [B, bs]
        block_scores = jnp.take_along_axis(scores, jnp.broadcast_to(pos[:, None], (batch, heads, pos.shape[1])), 2)
        _, best = jax.lax.top_k(block_scores, self.representatives)  # [B, H_q, r]
        chosen = jnp.take_along_axis(jnp.broadcast_to(pos[:, None], block_scores.shape), best, axis=2)
        fresh = self.unrotated_keys(keys, chosen, inv_freq).mean(2)  # [B, H_q, D]
        target = jnp.where(latest >= 0, latest, units.shape[2])
        return units.at[jnp.arange(batch), :, target].set(fresh, mode="drop")
