"""The draft tree: what a drafter proposes and the target verifies in one forward.

A tree of N nodes per sequence (N static, the same for the whole batch):

- node 0 is the **root**: the last committed token, which the target has not processed yet (it is
  not in the cache); its logits give the distribution of the first draft position;
- nodes 1..N-1 are draft tokens; `parents[b, i] < i` is the node that node i continues, so node
  indices are a topological order (a chain is `parents = [-1, 0, 1, 2, ...]`);
- an unused node (a drafter that found fewer candidates) has parent `UNUSED` (-2); it is never
  accepted and no node may continue it.

Siblings are tried in index order during acceptance. For sampling, `child_probs[b, i]` is the
distribution over the vocabulary that node i's children were drawn from, and `draw` says how:
"deterministic" (chosen, not sampled: prompt lookup, Token Recycling, greedy drafts; `child_probs` is
None), "independent" (each child an independent draw from `child_probs[b, i]`), or
"without_replacement" (children drawn in index order without replacement, e.g. Gumbel-top-k: child j's
law is `child_probs[b, i]` renormalised over the tokens its earlier siblings did not take).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ROOT_PARENT = -1
UNUSED = -2
DRAWS = ("deterministic", "independent", "without_replacement")
# The most nodes (root included) a drafter may propose. Verification builds an N x (S + N) attention
# mask and state-space targets keep one recurrent state per node, so memory grows with N (N^2 for the
# mask) and so does every round's forward; published trees are far smaller (Medusa / EAGLE about 60
# nodes, Token Recycling about 80, Sequoia's largest 768).
MAX_TREE_NODES = 1024
TREE_BOUND = f"a draft tree holds at most MAX_TREE_NODES = {MAX_TREE_NODES} nodes, the root included"


@flax.struct.dataclass
class DraftTree:
    """tokens, parents: [B, N] int32; child_probs: [B, N, V] float32 or None; draw: static (see module doc)."""

    tokens: jax.Array
    parents: jax.Array
    child_probs: jax.Array | None = None
    draw: str = flax.struct.field(pytree_node=False, default="deterministic")

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def used(self) -> jax.Array:
        """[B, N] bool: the nodes that exist (the root and every proposed draft)."""
        return self.parents != UNUSED


def chain(
    root: jax.Array, drafts: jax.Array, used: jax.Array | None = None, child_probs=None, draw: str = "deterministic"
) -> DraftTree:
    """A chain tree: `root: [B]` then `drafts: [B, K]` in order; `used: [B, K]` (optional) marks the
    drafts that exist (a prefix of each row: drafts after the first unused one are dropped too)."""
    batch, k = drafts.shape
    tokens = jnp.concatenate([root[:, None], drafts], axis=1).astype(jnp.int32)
    parents = jnp.broadcast_to(jnp.arange(-1, k, dtype=jnp.int32), (batch, k + 1))
    if used is not None:
        keep = jnp.cumprod(used.astype(jnp.int32), axis=1).astype(bool)
        parents = parents.at[:, 1:].set(jnp.where(keep, parents[:, 1:], UNUSED))
    return DraftTree(tokens, parents, child_probs, draw)


def ancestor_mask(parents: jax.Array) -> jax.Array:
    """[B, N, N] bool: mask[b, i, j] is True when node j is node i or one of its ancestors (what node
    i attends to inside the tree). An unused node sees only itself.

    Pointer jumping: after step k each node holds itself and its first 2^k - 1 ancestors, and `jump` its
    2^k-th ancestor (-1: none), so ceil(log2 N) steps cover any depth. Tracing costs O(log N) ops,
    not O(N): a large tree compiles as fast as a small one."""
    batch, n = parents.shape
    mask = jnp.broadcast_to(jnp.eye(n, dtype=bool), (batch, n, n))
    jump = jnp.where(parents >= 0, parents, -1).astype(jnp.int32)
    for _ in range(max(n - 1, 0).bit_length()):  # 2^steps > N - 1 >= any depth
        has = jump >= 0
        at = jnp.maximum(jump, 0)
        mask = mask | (jnp.take_along_axis(mask, at[:, :, None], axis=1) & has[:, :, None])
        jump = jnp.where(has, jnp.take_along_axis(jump, at, axis=1), -1)
    return mask


def depths(parents: jax.Array) -> jax.Array:
    """[B, N] int32 depth of each node (root 0, its children 1, ...); unused nodes get 0."""
    return ancestor_mask(parents).sum(axis=2, dtype=jnp.int32) - 1


def check_tree(tree: DraftTree, vocab_size: int | None = None) -> None:
    """Raise ValueError naming the problem if a concrete tree breaks the rules of the module doc."""
    if tree.draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {tree.draw!r}")
    if tree.tokens.ndim != 2 or tree.parents.shape != tree.tokens.shape:
        raise ValueError(f"tokens and parents must both be [B, N], got {tree.tokens.shape} and {tree.parents.shape}")
    if (tree.child_probs is None) != (tree.draw == "deterministic"):
        raise ValueError(
            f"child_probs must be given exactly when draw is sampled, got draw={tree.draw!r} and "
            f"child_probs {'None' if tree.child_probs is None else tree.child_probs.shape}"
        )
    if isinstance(tree.parents, jax.core.Tracer) or isinstance(tree.tokens, jax.core.Tracer):
        return
    parents, tokens = np.asarray(tree.parents), np.asarray(tree.tokens)
    if (parents[:, 0] != ROOT_PARENT).any():
        raise ValueError(
            f"node 0 must be the root (parent {ROOT_PARENT}), got parents[:, 0] = {parents[:, 0].tolist()}"
        )
    index = np.arange(parents.shape[1])[None, :]
    rest = parents[:, 1:]
    if ((rest != UNUSED) & ((rest < 0) | (rest >= index[:, 1:]))).any():
        b, i = np.argwhere((rest != UNUSED) & ((rest < 0) | (rest >= index[:, 1:])))[0]
        raise ValueError(f"node {i + 1} of row {b} has parent {rest[b, i]}; a draft's parent must be an earlier node")
    used = parents != UNUSED
    orphan = used[:, 1:] & ~np.take_along_axis(used, np.maximum(rest, 0), axis=1)
    if orphan.any():
        b, i = np.argwhere(orphan)[0]
        raise ValueError(f"node {i + 1} of row {b} continues unused node {rest[b, i]}")
    if vocab_size is not None and ((tokens[used] < 0) | (tokens[used] >= vocab_size)).any():
        raise ValueError(f"tree tokens must lie in [0, {vocab_size})")
