"""Prompt lookup decoding: draft the tokens that followed the latest earlier occurrence of the text's
last n tokens in the row's own history (prompt + generated). No model, no state.

For each row the suffix n-gram is `history[L - n:L]` (L = `lengths[b]`, so the root is its last token).
An occurrence ending at position e < L - 1 matches when `history[e - n + 1:e + 1]` equals it; the
longest n in [min_ngram, max_ngram] with a match wins, and among its matches the latest one. The draft
is the chain `history[e + 1:e + 1 + num_tokens]`, cut at the end of the history (e < L - 1, so at least
one token follows); a row with no match proposes only its root. Occurrences may overlap the suffix
(in "a a a" the 2-gram "a a" also ends at position 1, and is followed by "a").
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.option_spec import check_int
from ssm_llm.sampling import Sampling
from ssm_llm.speculative.protocol import DraftContext
from ssm_llm.speculative.tree import MAX_TREE_NODES, TREE_BOUND, DraftTree, chain

# The longest n-gram matched: each length unrolls one [B, S] comparison at trace time, and published
# settings match far shorter ones (3 to 5 tokens).
MAX_NGRAM = 64


def match_lengths(history: jax.Array, lengths: jax.Array, max_ngram: int) -> jax.Array:
    """[B, S] int32: for each candidate end position e, how many of the suffix's last tokens (at most
    `max_ngram`) the tokens ending at e repeat: `history[b, e - i] == history[b, L - 1 - i]` for
    i < m. Zero at e >= L - 1 (the suffix itself, and the unspecified tail of the history).

    history: [B, S] int32; lengths: [B] int32.
    """
    batch, seq = history.shape
    positions = jnp.arange(seq)[None, :]
    run = positions < (lengths - 1)[:, None]  # still matching after i tokens; valid ends only
    total = jnp.zeros((batch, seq), jnp.int32)
    for i in range(max_ngram):  # static and small: one shifted comparison per n-gram length
        suffix_pos = lengths - 1 - i
        suffix_token = jnp.take_along_axis(history, jnp.maximum(suffix_pos, 0)[:, None], axis=1)
        earlier = jnp.pad(history, ((0, 0), (i, 0)))[:, :seq]  # earlier[b, e] = history[b, e - i]
        run = run & (positions >= i) & (suffix_pos >= 0)[:, None] & (earlier == suffix_token)
        total = total + run.astype(jnp.int32)
    return total


@flax.struct.dataclass
class PromptLookup:
    """Prompt lookup drafter (see the module doc): proposes a chain of up to `num_tokens` tokens copied
    from the row's history after its longest (n in [min_ngram, max_ngram]), latest repeated suffix.

    The default of 3 drafts was the faster of experiments/bench_speculative.py's two on a 2-core CPU
    (0.79x / 0.74x / 1.10x plain greedy on chat / code / extraction prompts; 8 drafts: 0.69x / 0.65x /
    1.15x). Where verifying more tokens is nearly free (a GPU), or the output copies long spans of
    the prompt, more drafts pay off.
    """

    num_tokens: int = flax.struct.field(pytree_node=False, default=3)
    max_ngram: int = flax.struct.field(pytree_node=False, default=3)
    min_ngram: int = flax.struct.field(pytree_node=False, default=1)

    def __post_init__(self):
        check_int("PromptLookup", "num_tokens", self.num_tokens, 1, MAX_TREE_NODES - 1, TREE_BOUND)
        for name in ("min_ngram", "max_ngram"):
            check_int("PromptLookup", name, getattr(self, name), 1, MAX_NGRAM, f"MAX_NGRAM = {MAX_NGRAM}")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"PromptLookup: max_ngram ({self.max_ngram}) must be >= min_ngram ({self.min_ngram})")

    @property
    def tree_size(self) -> int:
        return self.num_tokens + 1

    def init(
        self, params: dict, config, prompts: jax.Array, lengths: jax.Array, max_len: int, impl: str = "auto"
    ) -> tuple:
        """No state: the history in the DraftContext is all prompt lookup needs."""
        return ()

    def propose(self, state, context: DraftContext, sampling: Sampling, key: jax.Array) -> tuple[DraftTree, tuple]:
        history, lengths = context.history, context.lengths
        seq = history.shape[1]
        matched = match_lengths(history, lengths, self.max_ngram)
        # The longest match wins, then the latest end: one argmax over match * S + end.
        score = jnp.where(matched >= self.min_ngram, matched * seq + jnp.arange(seq)[None, :], -1)
        end = jnp.argmax(score, axis=1)
        found = jnp.max(score, axis=1) >= 0
        follow = end[:, None] + 1 + jnp.arange(self.num_tokens)[None, :]  # [B, K]
        drafts = jnp.take_along_axis(history, jnp.minimum(follow, seq - 1), axis=1)
        used = found[:, None] & (follow < lengths[:, None])
        root = jnp.take_along_axis(history, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        return chain(root, drafts, used), state

    def update(self, state, context: DraftContext, tree: DraftTree, logits: jax.Array, acceptance) -> tuple:
        return state
