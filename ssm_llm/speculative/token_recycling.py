"""Token Recycling (Luo et al., 2024, "Turning Trash into Treasure: Accelerating Inference of Large
Language Models with Token Recycling"): no draft model and no training. An adjacency matrix
`adj: [V, k]` holds, for every token, the k tokens the target ranked highest after it the last time
that token was a node of a verified tree; -1 marks a token never seen. A static tree template then
drafts by lookup: node i, given as (parent, rank), takes `adj[token of parent, rank]`.

Each verification recycles the target's logits at every used node of the tree (not only the accepted
ones) into the matrix, so candidates the target rejected still teach it what follows their tokens.
The matrix is shared by the rows of the batch and can be carried from one generate call to the next
(`TokenRecycling(adjacency=...)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.option_spec import check_int, is_int, shown
from ssm_llm.sampling import Sampling
from ssm_llm.speculative.protocol import Acceptance, DraftContext
from ssm_llm.speculative.tree import MAX_TREE_NODES, TREE_BOUND, UNUSED, DraftTree

UNKNOWN = -1


def bfs_template(branching: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """A tree template, level by level: `branching[d][j]` is how many children the j-th node of depth d
    (in BFS order) has; its children take the ranks 0..count-1 and come after every node of depth d.
    `branching[0]` has one entry, the root's; a level may list fewer counts than it has nodes (the
    rest are leaves). Returns the (parent, rank) of nodes 1..N-1 in BFS order.

    Example: `((2,), (1,))` -> root children ranks 0 and 1 (nodes 1, 2), then node 1's rank-0 child
    (node 3): `((0, 0), (0, 1), (1, 0))`.
    """
    template: list[tuple[int, int]] = []
    level = [0]  # node indices of the current depth
    for depth, counts in enumerate(branching):
        if isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__"):
            raise ValueError(f"bfs_template: level {depth} must be a sequence of child counts, got {shown(counts)}")
        counts = tuple(counts)
        if len(counts) > len(level):
            raise ValueError(
                f"bfs_template: level {depth} lists {len(counts)} child counts, but has only {len(level)} nodes"
            )
        next_level = []
        for parent, count in zip(level, counts, strict=False):  # later nodes of a level may have no children
            room = MAX_TREE_NODES - 1 - len(template)  # checked before the loop: a huge count cannot hang it
            check_int("bfs_template", f"child count of node {parent}", count, 0, room, TREE_BOUND)
            for rank in range(count):
                template.append((parent, rank))
                next_level.append(len(template))
        level = next_level
    return tuple(template)


# Wide near the root, where acceptance is likeliest, and deepest along the rank-0 chain: 20 drafts,
# depth 6, in the spirit of the paper's templates. Meant for where a 21-node forward costs about what a
# one-token forward does (a GPU): pass `template=WIDE_TEMPLATE` there.
WIDE_TEMPLATE = bfs_template(
    (
        (4,),  # the root: ranks 0..3
        (3, 2, 1, 1),  # depth 1
        (2, 1, 0, 1),  # depth 2: under (0, 0), (0, 1) and (1, 0)
        (2, 1),  # depth 3: under the rank-0 chain and its sibling
        (1,),  # depth 4
        (1,),  # depth 5
    )
)

# The default: 5 drafts, depth 3 (two root children, one child under each, one more under the rank-0
# chain), the faster template in experiments/bench_speculative.py on a 2-core CPU, where a forward of N
# nodes costs 1.95x (N = 6) to 3.3x (N = 21) a one-token forward: 0.82x / 0.75x / 0.89x plain greedy's
# speed on chat / code / extraction prompts, against 0.66x / 0.61x / 0.67x for WIDE_TEMPLATE.
DEFAULT_TEMPLATE = bfs_template(((2,), (1, 1), (1,)))


@flax.struct.dataclass
class TokenRecycling:
    """Token Recycling drafter (see the module doc).

    candidates: k, the tokens kept per row of the adjacency matrix (static); template: (parent, rank)
    of nodes 1..N-1, parents before children, ranks < k (static; `bfs_template` builds one; the
    default, `DEFAULT_TEMPLATE`, is the faster of experiments/bench_speculative.py's two on a CPU;
    `WIDE_TEMPLATE` is meant for accelerators; the default template reads ranks 0-1 only, k = 8 keeps
    the matrix useful for wider templates and later calls); adjacency: an optional starting matrix
    [V, k] int (-1 for unknown), e.g. the state a previous generate call ended with.
    State: the adjacency matrix `[V, k]` int32.
    """

    candidates: int = flax.struct.field(pytree_node=False, default=8)
    template: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False, default=DEFAULT_TEMPLATE)
    adjacency: jax.Array | None = None

    def __post_init__(self):
        # Runs again whenever JAX rebuilds the drafter from its leaves: check only the static fields.
        check_int("TokenRecycling", "candidates", self.candidates)
        try:
            template = tuple((parent, rank) for parent, rank in self.template)
        except (TypeError, ValueError):
            template = ((None, None),)  # not pairs: refused just below
        if not all(is_int(parent) and is_int(rank) for parent, rank in template):
            raise ValueError(
                f"TokenRecycling: template must be a sequence of (parent, rank) int pairs, got {shown(self.template)}"
            )
        template = tuple((int(parent), int(rank)) for parent, rank in template)
        if not template:
            raise ValueError("TokenRecycling: template must have at least one node")
        if len(template) > MAX_TREE_NODES - 1:
            raise ValueError(
                f"TokenRecycling: template has {len(template)} nodes, at most {MAX_TREE_NODES - 1} fit ({TREE_BOUND})"
            )
        for node, (parent, rank) in enumerate(template, start=1):
            if not 0 <= parent < node:
                raise ValueError(
                    f"TokenRecycling: template node {node} has parent {parent}; expected a parent in "
                    f"[0, {node}) (the root or an earlier node)"
                )
            if not 0 <= rank < self.candidates:
                raise ValueError(
                    f"TokenRecycling: template node {node} has rank {rank}; expected a rank in "
                    f"[0, candidates={self.candidates})"
                )
        if len(set(template)) != len(template):
            raise ValueError("TokenRecycling: template repeats a (parent, rank) pair; each would draft the same token")
        object.__setattr__(self, "template", template)  # hashable, as a static field must be

    @property
    def tree_size(self) -> int:
        return len(self.template) + 1

    def init(
        self, params: dict, config, prompts: jax.Array, lengths: jax.Array, max_len: int, impl: str = "auto"
    ) -> jax.Array:
        """The adjacency matrix [V, k] int32: `self.adjacency`, or all unknown."""
        shape = (config.vocab_size, self.candidates)
        if self.candidates > config.vocab_size:
            raise ValueError(
                f"TokenRecycling: candidates ({self.candidates}) exceeds the vocabulary ({config.vocab_size} tokens)"
            )
        if self.adjacency is None:
            return jnp.full(shape, UNKNOWN, jnp.int32)
        adjacency = jnp.asarray(self.adjacency)
        if adjacency.shape != shape or not jnp.issubdtype(adjacency.dtype, jnp.integer):
            raise ValueError(
                f"TokenRecycling: adjacency must be an int array of shape {shape} (vocab_size, "
                f"candidates), got {adjacency.dtype} {adjacency.shape}"
            )
        return adjacency.astype(jnp.int32)

    def propose(
        self, state: jax.Array, context: DraftContext, sampling: Sampling, key: jax.Array
    ) -> tuple[DraftTree, jax.Array]:
        """Fill the template from the matrix, one depth at a time. A node is unused when its parent is
        or when its candidate is unknown; unused nodes hold token 0."""
        adj = state
        parent_of = np.array([-1] + [p for p, _ in self.template])
        rank_of = np.array([0] + [r for _, r in self.template])
        depth = np.zeros(self.tree_size, int)
        for node in range(1, self.tree_size):
            depth[node] = depth[parent_of[node]] + 1

        root = jnp.take_along_axis(context.history, jnp.maximum(context.lengths - 1, 0)[:, None], axis=1)[:, 0]
        batch = root.shape[0]
        tokens = jnp.zeros((batch, self.tree_size), jnp.int32).at[:, 0].set(root)
        used = jnp.zeros((batch, self.tree_size), bool).at[:, 0].set(True)
        for d in range(1, depth.max() + 1):  # static: every node of depth d reads a node of depth d - 1
            nodes = np.flatnonzero(depth == d)
            parents = parent_of[nodes]
            candidate = adj[tokens[:, parents], rank_of[nodes]]  # [B, nodes]
            ok = used[:, parents] & (candidate >= 0)  # any negative entry reads as unknown
            tokens = tokens.at[:, nodes].set(jnp.where(ok, candidate, 0))
            used = used.at[:, nodes].set(ok)
        tree_parents = jnp.where(used, jnp.asarray(parent_of, jnp.int32)[None, :], UNUSED)
        return DraftTree(tokens, tree_parents), state

    def update(
        self, state: jax.Array, context: DraftContext, tree: DraftTree, logits: jax.Array, acceptance: Acceptance
    ) -> jax.Array:
        """`adj[token of node] = top-k of logits[b, node]` for every used node of every active row.
        logits: [B, N, V]. When a token appears at several nodes (or rows) in one round, one of their
        writes wins, unspecified which (each is a fresh target prediction after that token)."""
        adj = state
        _, top = jax.lax.top_k(logits, self.candidates)  # [B, N, k]
        writes = tree.used & context.active[:, None]
        rows = jnp.where(writes, tree.tokens, adj.shape[0])  # out of range: dropped
        return adj.at[rows.reshape(-1)].set(top.reshape(-1, self.candidates).astype(jnp.int32), mode="drop")
