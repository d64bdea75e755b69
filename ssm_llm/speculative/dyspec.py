"""DySpec (Xiong et al. 2024): a draft tree grown greedily by estimated acceptance.

A node's estimated acceptance is the product of the draft probabilities along its path. Every computed
node ranks its candidate children (greedy: tokens by draft probability; sampling: a draw without
replacement of the whole vocabulary, the Gumbel-perturbed order) and points at its next untaken one;
the tree grows by the best candidates over the whole tree until it holds `tree_size` nodes. A node's
children are thus always a prefix of its ranking, which under sampling is a sequence of draws without
replacement (draw "without_replacement"), so verification stays exact.

Where this departs from the paper: the paper pops one node at a time from a heap and runs the draft
model on it before choosing the next. Here each step takes the `per_step` best candidates at once and
computes all of them in one `verify.tree_logits` call, so a step cannot choose a child of a node chosen
in the same step; `per_step=1` is the paper's one-at-a-time expansion (the tree of the `tree_size - 1`
highest path probabilities within `max_depth`), larger values trade some of that for fewer draft calls.
Under sampling a candidate's score is the least path probability among it and its node's earlier
untaken candidates, so the chosen children of a node stay a prefix of its ranking.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.option_spec import check_int
from ssm_llm.sampling import Sampling
from ssm_llm.speculative import verify
from ssm_llm.speculative.draft_model import (
    DraftModelState,
    ModelDrafter,
    check_draft_config,
    draft_probs,
    ranked_children,
    roots,
)
from ssm_llm.speculative.protocol import DraftContext
from ssm_llm.speculative.tree import MAX_TREE_NODES, ROOT_PARENT, TREE_BOUND, UNUSED, DraftTree


@flax.struct.dataclass
class _Growth:
    """The tree being grown, per row. tokens, parents, depth, taken (children chosen so far): [B, N] int32;
    path_prob: [B, N] float32 (product of draft probabilities from the root); ranking: [B, N, N-1] int32 (a
    computed node's candidate children, best first); ranked_probs: [B, N, N-1] float32 (their draft
    probabilities); probs: [B, N, V] float32 draft law of every computed node (sampling) or None."""

    tokens: jax.Array
    parents: jax.Array
    depth: jax.Array
    taken: jax.Array
    path_prob: jax.Array
    ranking: jax.Array
    ranked_probs: jax.Array
    probs: jax.Array | None


def step_sizes(tree_size: int, per_step: int) -> list[int]:
    """How many nodes each growth step adds: `per_step` at a time up to `tree_size - 1` drafts."""
    drafts = tree_size - 1
    return [per_step] * (drafts // per_step) + ([drafts % per_step] if drafts % per_step else [])


@flax.struct.dataclass
class DySpec(ModelDrafter):
    """DySpec drafting with a draft model (`params`, `config`: any family, the target's vocabulary): a tree
    of `tree_size` nodes (root included) and depth at most `max_depth`, grown `per_step` nodes per draft
    model call."""

    params: dict
    config: object = flax.struct.field(pytree_node=False)
    tree_size: int = flax.struct.field(pytree_node=False, default=16)
    max_depth: int = flax.struct.field(pytree_node=False, default=6)
    per_step: int = flax.struct.field(pytree_node=False, default=4)

    def __post_init__(self):
        check_draft_config("DySpec", self.config)
        check_int("DySpec", "tree_size", self.tree_size, 2, MAX_TREE_NODES, TREE_BOUND)
        # A tree of tree_size nodes has at most tree_size - 1 levels below the root and as many drafts.
        for name in ("max_depth", "per_step"):
            check_int("DySpec", name, getattr(self, name), 1, MAX_TREE_NODES - 1, TREE_BOUND)
        # The root alone must be able to supply every draft, so a step always finds enough candidates.
        if self.tree_size - 1 > self.config.vocab_size:
            raise ValueError(
                f"DySpec: tree_size {self.tree_size} needs at least {self.tree_size - 1} vocabulary "
                f"tokens, the draft model has {self.config.vocab_size}"
            )

    @property
    def computed_nodes(self) -> int:
        return self.tree_size - step_sizes(self.tree_size, self.per_step)[-1]  # the last step's nodes are leaves

    def _compute(
        self, state: DraftModelState, grown: _Growth, scratch, start, count: int, sampling: Sampling, key: jax.Array
    ):
        """Run the draft model on nodes start..start+count-1 and rank their candidate children."""
        batch = grown.tokens.shape[0]
        nodes = jnp.broadcast_to(start + jnp.arange(count, dtype=jnp.int32), (batch, count))
        logits, scratch = verify.tree_logits(
            self.params, self.config, state.cache, DraftTree(grown.tokens, grown.parents), scratch, nodes, state.impl
        )
        probs = draft_probs(logits, sampling)  # [B, count, V]
        ranking = ranked_children(logits, sampling, key, self.tree_size - 1)
        ranked_probs = jnp.take_along_axis(probs, ranking, axis=2)
        grown = grown.replace(
            ranking=jax.lax.dynamic_update_slice(grown.ranking, ranking, (0, start, 0)),
            ranked_probs=jax.lax.dynamic_update_slice(grown.ranked_probs, ranked_probs, (0, start, 0)),
            probs=None if grown.probs is None else jax.lax.dynamic_update_slice(grown.probs, probs, (0, start, 0)),
        )
        return grown, scratch

    def _grow(self, grown: _Growth, start, count: int, sampling: Sampling) -> _Growth:
        """Add nodes start..start+count-1: the `count` best candidates of the nodes before `start` (all computed)."""
        batch, size = grown.tokens.shape
        ranks = grown.ranking.shape[2]
        # Each node offers its next `count` untaken candidates; no step takes more from one node.
        slot = grown.taken[:, :, None] + jnp.arange(count)[None, None, :]  # [B, N, count]
        index = jnp.arange(size)[None, :]
        expandable = (index < start) & (grown.parents != UNUSED) & (grown.depth < self.max_depth)
        valid = expandable[:, :, None] & (slot < ranks)
        prob = jnp.take_along_axis(grown.ranked_probs, jnp.minimum(slot, ranks - 1), axis=2)
        score = grown.path_prob[:, :, None] * prob
        if not sampling.greedy:
            # The Gumbel order is not by probability: a candidate is worth no more than the earlier ones
            # it needs, so the best-scored set is a prefix of each node's ranking.
            score = jax.lax.cummin(score, axis=2)
        score = jnp.where(valid, score, -jnp.inf)
        _, best = jax.lax.top_k(score.reshape(batch, size * count), count)
        parent = (best // count).astype(jnp.int32)  # [B, count]
        # A node's chosen candidates take its next ranks in choice order (a prefix, whatever the tie order).
        same = parent[:, :, None] == parent[:, None, :]
        before = jnp.tril(jnp.ones((count, count), bool), -1)[None]
        rank = jnp.take_along_axis(grown.taken, parent, axis=1) + jnp.sum(same & before, axis=2)
        rows = jnp.arange(batch)[:, None]
        token = grown.ranking[rows, parent, rank]
        path_prob = grown.path_prob[rows, parent] * grown.ranked_probs[rows, parent, rank]
        depth = grown.depth[rows, parent] + 1

        def put(x, new):
            return jax.lax.dynamic_update_slice(x, new.astype(x.dtype), (0, start))

        return grown.replace(
            tokens=put(grown.tokens, token),
            parents=put(grown.parents, parent),
            depth=put(grown.depth, depth),
            path_prob=put(grown.path_prob, path_prob),
            taken=grown.taken.at[rows, parent].add(1),
        )

    def propose(
        self, state: DraftModelState, context: DraftContext, sampling: Sampling, key: jax.Array
    ) -> tuple[DraftTree, DraftModelState]:
        """A dynamic tree `[B, tree_size]` rooted at each row's last committed token."""
        batch, size = context.lengths.shape[0], self.tree_size
        grown = _Growth(
            tokens=jnp.zeros((batch, size), jnp.int32).at[:, 0].set(roots(context)),
            parents=jnp.full((batch, size), UNUSED, jnp.int32).at[:, 0].set(ROOT_PARENT),
            depth=jnp.zeros((batch, size), jnp.int32),
            taken=jnp.zeros((batch, size), jnp.int32),
            path_prob=jnp.zeros((batch, size), jnp.float32).at[:, 0].set(1.0),
            ranking=jnp.zeros((batch, size, size - 1), jnp.int32),
            ranked_probs=jnp.zeros((batch, size, size - 1), jnp.float32),
            probs=None if sampling.greedy else jnp.zeros((batch, size, self.config.vocab_size), jnp.float32),
        )
        sizes = step_sizes(size, self.per_step)
        grown, scratch = self._compute(state, grown, None, 0, 1, sampling, jax.random.fold_in(key, 0))

        def full_step(s, carry):
            """Grow `per_step` nodes and compute them (every step but the last, whose nodes are leaves)."""
            grown, scratch = carry
            start = 1 + s * self.per_step
            grown = self._grow(grown, start, self.per_step, sampling)
            return self._compute(state, grown, scratch, start, self.per_step, sampling, jax.random.fold_in(key, s + 1))

        grown, scratch = jax.lax.fori_loop(0, len(sizes) - 1, full_step, (grown, scratch))
        grown = self._grow(grown, size - sizes[-1], sizes[-1], sampling)
        tree = DraftTree(
            grown.tokens, grown.parents, grown.probs, "deterministic" if sampling.greedy else "without_replacement"
        )
        return tree, state.with_scratch(self.config, scratch)
