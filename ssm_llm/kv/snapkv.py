"""SnapKV and PyramidKV: keep the prompt tokens that the prompt's last queries attend to.

Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation": the attention that
the last `window` prompt tokens (the observation window) pay to earlier tokens predicts which tokens
generation will need, so after prefill each KV head keeps the window plus its top-scored earlier
tokens. Per layer, sequence of n prompt tokens and KV head, with query heads h of the head's GQA group:
  1. a_h[s] = mean over the window queries of softmax_s(q . k_s / sqrt(D)) (causal over the prompt),
     for the prefix keys s < n - window (0 elsewhere);
  2. a_h is smoothed by 1-D pooling of `kernel_size` (stride 1, kernel_size // 2 padding each side,
     so the length is kept): "max" (the paper's default) or "avg" (the padding counts as zeros);
  3. score[s] = mean of the pooled a_h over the group's query heads (K/V are never repeated);
  4. the head keeps the window tokens plus the (budget - window) prefix tokens of highest score.
This is NVIDIA kvpress's SnapKVPress (0.5.5) with pooling="avg", including its order (pool per query
head, then the group mean); `tests/kv/test_kv_snapkv.py` checks our kept sets against kvpress's.

Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling":
attention gets more focused in higher layers, so lower layers keep more tokens and higher layers fewer.
With `pyramid=True`, L layers, w = min(window, budget) and m = budget - w kept prefix tokens on
average, layer l (0 = bottom) keeps
    budget_l = w + round(bottom + (top - bottom) * l / (L - 1)),  top = m / beta,  bottom = 2 m - top
(l / (L - 1) is 1/2 when L = 1). This is an arithmetic sequence from bottom to top, the window kept
in every layer as in the paper's code; its mean is exactly `budget` (round half to even is symmetric
about m), and bottom / top = 2 beta - 1. Slots are sized for the bottom layer; higher layers leave
theirs empty. (kvpress's PyramidKVPress differs: it spreads the window-inclusive budget, clips the
bottom layer to the prompt, and falls back to flat SnapKV when the top layer would hold less than
the window.)

Parameters:
  budget: tokens kept per sequence, the window included (an int), or the kept fraction of each
    prompt (a float in (0, 1], rounded to the nearest count; kvpress's compression_ratio r keeps
    int(n * (1 - r)) tokens); a prompt no longer than its budget keeps everything; a fraction that
    keeps no token of a prompt of n tokens (round(budget * n) < 1) is an error wherever the prompt
    lengths are known (`ssm_llm.kv.prefill`, `generate`; under jit the padded length is checked and
    a shorter row keeps at least one token);
  window: observation window (the last prompt tokens, always kept); must not exceed an int budget
    (a fractional budget below the window keeps the most recent tokens);
  kernel_size: pooling width, odd; pooling: "max" or "avg";
  pyramid: PyramidKV layer budgets; beta (>= 1): the pyramid's steepness (1: flat, i.e. SnapKV).
Kept tokens stay rotated at their original positions; decoded tokens are appended after them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import (
    KVPolicy,
    check_budget,
    check_positive_int,
    observed_attention,
    resolve_budget,
    rope_frequencies,
)
from ssm_llm.kv.slots import SlotKV, gather_slots, slot_attention, write_slot
from ssm_llm.option_spec import check_bool, is_real, shown
from ssm_llm.rope import rotate

POOLING = ("max", "avg")


def window_scores(keys, queries, q_positions, lengths, window: int, kernel_size: int, pooling: str):
    """SnapKV scores of one layer's prompt keys (steps 1-3 of the module docstring).

    keys: [B, H_kv, S, D] rotated; queries: [B, W, H_q, D] rotated, at positions q_positions: [B, W]
    (-1: no query, ignored); lengths: [B] prompt lengths. Returns [B, H_kv, S] float32, zero outside
    each row's prefix [0, length - window).
    """
    count = jnp.maximum(jnp.sum(q_positions >= 0, axis=1), 1)
    attn = observed_attention(keys, queries, q_positions) / count[:, None, None, None]  # [B, H_kv, G, S]
    prefix = jnp.arange(keys.shape[2])[None, :] < (lengths - window)[:, None]
    attn = jnp.where(prefix[:, None, None], attn, 0.0)
    init, op = (-jnp.inf, jax.lax.max) if pooling == "max" else (0.0, jax.lax.add)
    # A kernel of 2 S - 1 already spans every key from every position: wider ones pool the same values
    # (the divisor below stays kernel_size), without padding the scores by a huge width.
    width = min(kernel_size, 2 * keys.shape[2] - 1)
    pad = width // 2
    pooled = jax.lax.reduce_window(attn, init, op, (1, 1, 1, width), (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (pad, pad)))
    if pooling == "avg":
        pooled = pooled / kernel_size
    return jnp.where(prefix[:, None], pooled.mean(axis=2), 0.0)


def select_tokens(scores, lengths, window: int, budgets, n: int):
    """Positions kept per head: each row's last `window` tokens, then its best-scored prefix tokens.

    scores: [..., B, H_kv, S] (prefix scores in [0, 1]); lengths: [B]; budgets: [..., B] tokens kept;
    n (static) >= every budget. Returns [..., B, H_kv, n] int32 positions, the kept ones first, -1 after.
    """
    s = jnp.arange(scores.shape[-1])
    length = lengths[:, None, None]
    # The window outranks every score (most recent first, should a budget be below the window);
    # positions past the prompt rank last.
    ranked = jnp.where(s >= length - window, 2.0 + s, scores)
    ranked = jnp.where(s < length, ranked, -1.0)
    idx = jax.lax.top_k(ranked, n)[1]
    keep = (jnp.arange(n) < budgets[..., None, None]) & (idx < length)
    return jnp.where(keep, idx, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Observation-window eviction after prefill, optionally with PyramidKV layer budgets (see the
    module docstring)."""

    budget: int | float
    window: int = 32
    kernel_size: int = 5
    pooling: str = "max"
    pyramid: bool = False
    beta: float = 20.0

    def __post_init__(self):
        check_budget("SnapKV", self.budget)
        check_positive_int("SnapKV", "window", self.window)
        if not isinstance(self.budget, float) and self.window > self.budget:
            raise ValueError(
                f"SnapKV: window ({self.window}) must not exceed budget ({self.budget}): "
                f"the window tokens are always kept"
            )
        check_positive_int("SnapKV", "kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"SnapKV: kernel_size must be odd (same-length pooling), got {self.kernel_size}")
        if self.pooling not in POOLING:
            raise ValueError(f"SnapKV: pooling must be one of {POOLING}, got {self.pooling!r}")
        check_bool("SnapKV", "pyramid", self.pyramid)
        if not is_real(self.beta) or self.beta < 1:
            raise ValueError(f"SnapKV: beta must be a number >= 1 (and finite), got {shown(self.beta)}")

    def check(self, config, prompt_lengths):
        for n in prompt_lengths:  # a fraction must keep a token of every prompt
            resolve_budget("SnapKV", self.budget, n)

    @property
    def observation_window(self) -> int:
        return self.window

    def layer_budgets(self, budget, num_layers: int):
        """[L, ...] tokens kept per layer for a per-sequence `budget` (an int, or an int array [...]
        under jit): the PyramidKV sequence of the module docstring, or `budget` everywhere without
        `pyramid`. float32 arithmetic either way, so static slot counts match traced budgets."""
        xp = jnp if isinstance(budget, jax.Array) else np
        budget = xp.asarray(budget)
        w = xp.minimum(budget, self.window)
        m = (budget - w).astype(xp.float32)
        top = m / xp.float32(self.beta if self.pyramid else 1.0)
        bottom = 2 * m - top
        if num_layers > 1:
            frac = xp.arange(num_layers, dtype=xp.float32) / xp.float32(num_layers - 1)
        else:
            frac = xp.full(1, 0.5, xp.float32)
        frac = frac.reshape((num_layers,) + (1,) * budget.ndim)
        return (w + xp.round(bottom + (top - bottom) * frac)).astype(xp.int32)

    def kept_slots(self, prompt_len: int) -> int:
        """Slots holding prompt tokens: the largest layer budget (the bottom one), at most the prompt."""
        budget = resolve_budget("SnapKV", self.budget, prompt_len)
        # the bottom layer's budget is the same for every L > 1 (and L = 1 keeps `budget`, less)
        return min(int(self.layer_budgets(budget, 2)[0]), prompt_len)

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return self.kept_slots(prompt_len) + max_len - prompt_len

    def row_budgets(self, lengths):
        """[B] tokens kept per sequence: the int budget, or the fraction of each prompt's own length."""
        if isinstance(self.budget, float):  # >= 1: `check` refuses a fraction that keeps no token of a known prompt
            return jnp.maximum(1, jnp.round(self.budget * lengths.astype(jnp.float32))).astype(jnp.int32)
        return jnp.full(lengths.shape, self.budget, jnp.int32)

    def scores(self, cache, observation):
        """[L, B, H_kv, S] SnapKV scores of every layer (one layer at a time, to bound the memory)."""

        def one_layer(layer):
            keys, queries = layer
            return window_scores(
                keys, queries, observation.positions, cache.lengths, self.window, self.kernel_size, self.pooling
            )

        return jax.lax.map(one_layer, (cache.k, observation.queries))

    def compress(self, config, cache, observation, capacity):
        budgets = self.layer_budgets(self.row_budgets(cache.lengths), cache.k.shape[0])  # [L, B]
        keep = select_tokens(
            self.scores(cache, observation), cache.lengths, self.window, budgets, self.kept_slots(cache.max_len)
        )
        used = jnp.max(jnp.sum(keep[:, :, 0] >= 0, axis=-1), axis=0)  # the most any layer keeps
        return gather_slots(cache, keep, capacity), used

    def attend(self, config, data: SlotKV, step: AttentionStep, q, k, v, impl):
        index, positions, used, window = step.layer, step.positions, step.used, step.window
        if q.shape[1] != 1:
            raise ValueError(f"SnapKV decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        p = positions[:, 0]
        data = write_slot(data, index, used, rotate(k[:, 0], p[:, None], inv_freq), v[:, 0], p)
        q = rotate(q, positions[:, :, None], inv_freq)
        return slot_attention(q, data.k[index], data.v[index], data.pos[index], positions, window), data
