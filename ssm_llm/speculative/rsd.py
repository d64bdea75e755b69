"""Recursive Speculative Decoding (Jeon et al. 2024), the constant-branching variant RSD-C.

Every node at level d gets `branching[d]` children drawn without replacement from the draft model's
distribution at that node (Gumbel-top-k), so the target can accept with recursive rejection sampling
over siblings (draw "without_replacement"). Under greedy decoding the children are the draft's
`branching[d]` most probable tokens (draw "deterministic"). Nodes are numbered level by level, one
`verify.tree_logits` call per level; the last level is not expanded.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.option_spec import is_int, shown
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


def level_offsets(branching: tuple[int, ...]) -> np.ndarray:
    """[D + 2] int: node index where each level starts (level 0 is the root), then the tree size."""
    sizes = np.cumprod((1, *branching))
    return np.concatenate([[0], np.cumsum(sizes)])


def tree_parents(branching: tuple[int, ...]) -> np.ndarray:
    """[N] int32: the parents of the level-by-level RSD-C tree (node j of level d has children
    j * branching[d] .. (j + 1) * branching[d] - 1 of level d + 1)."""
    offsets = level_offsets(branching)
    parents = [np.array([ROOT_PARENT])]
    for d, b in enumerate(branching):
        count = offsets[d + 2] - offsets[d + 1]
        parents.append(offsets[d] + np.arange(count) // b)
    return np.concatenate(parents).astype(np.int32)


@flax.struct.dataclass
class RSD(ModelDrafter):
    """RSD-C drafting with a draft model (`params`, `config`: any family, the target's vocabulary):
    a tree of `1 + b0 + b0*b1 + ...` nodes for `branching = (b0, b1, ...)`."""

    params: dict
    config: object = flax.struct.field(pytree_node=False)
    branching: tuple[int, ...] = flax.struct.field(pytree_node=False, default=(3, 2, 2, 1))

    def __post_init__(self):
        check_draft_config("RSD", self.config)
        b = self.branching
        if not isinstance(b, (tuple, list)) or not b or not all(is_int(x) and x >= 1 for x in b):
            raise ValueError(f"RSD: branching must be a non-empty tuple of ints >= 1, got {shown(b)}")
        size = level = 1  # Python ints, stopping early: a product of huge factors must not overflow
        for x in b:
            level *= int(x)
            size += level
            if size > MAX_TREE_NODES:
                raise ValueError(
                    f"RSD: branching {shown(b)} makes a tree of more than {MAX_TREE_NODES} nodes ({TREE_BOUND})"
                )
        if max(b) > self.config.vocab_size:
            raise ValueError(
                f"RSD: branching {b} asks for more children than the vocabulary has tokens ({self.config.vocab_size})"
            )
        object.__setattr__(self, "branching", tuple(int(x) for x in b))  # hashable, as a static field must be

    @property
    def tree_size(self) -> int:
        return int(level_offsets(self.branching)[-1])

    @property
    def computed_nodes(self) -> int:
        return int(level_offsets(self.branching)[-2])  # every level but the last

    def propose(
        self, state: DraftModelState, context: DraftContext, sampling: Sampling, key: jax.Array
    ) -> tuple[DraftTree, DraftModelState]:
        """The RSD-C tree `[B, tree_size]` rooted at each row's last committed token."""
        batch, size = context.lengths.shape[0], self.tree_size
        offsets = level_offsets(self.branching)
        all_parents = tree_parents(self.branching)
        tokens = jnp.zeros((batch, size), jnp.int32).at[:, 0].set(roots(context))
        probs = None if sampling.greedy else jnp.zeros((batch, size, self.config.vocab_size), jnp.float32)
        scratch = None
        for d, b in enumerate(self.branching):  # levels differ in size: one traced call each
            start, stop, end = (int(x) for x in offsets[d : d + 3])
            # Nodes of later levels do not exist yet.
            parents = jnp.broadcast_to(
                jnp.asarray(np.where(np.arange(size) < stop, all_parents, UNUSED)), (batch, size)
            )
            nodes = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (batch, stop - start))
            logits, scratch = verify.tree_logits(
                self.params, self.config, state.cache, DraftTree(tokens, parents), scratch, nodes, state.impl
            )
            children = ranked_children(logits, sampling, jax.random.fold_in(key, d), b)  # [B, stop - start, b]
            tokens = tokens.at[:, stop:end].set(children.reshape(batch, end - stop))
            if probs is not None:
                probs = probs.at[:, start:stop].set(draft_probs(logits, sampling))
        parents = jnp.broadcast_to(jnp.asarray(all_parents), (batch, size))
        tree = DraftTree(tokens, parents, probs, "deterministic" if sampling.greedy else "without_replacement")
        return tree, state.with_scratch(self.config, scratch)
