"""Exact acceptance of a draft tree: which drafts the target keeps, and the bonus token after them.

Both rules walk the tree in one `lax.scan` over node indices 1..N-1. A row's current node `c` starts
at the root; node i is a candidate when `parents[b, i] == c`. Because `parents[i] < i`, one pass in
index order meets c's children in sibling order, and an accepted child's own children only later
(their indices are larger), while the subtrees of rejected siblings never become candidates again.

Greedy keeps the first child whose token is the target's argmax at c. Sampling is recursive rejection
sampling (see `accept_sampling`): the emitted tokens follow the target's distribution exactly, for
every `DraftTree.draw`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssm_llm.sampling import Sampling, greedy_tokens
from ssm_llm.speculative.protocol import Acceptance
from ssm_llm.speculative.tree import DraftTree, check_tree


def _check_scores(tree: DraftTree, scores: jax.Array, name: str) -> None:
    if scores.ndim != 3 or scores.shape[:2] != tree.tokens.shape:
        raise ValueError(
            f"{name} must be [B, N, V] = [{tree.batch}, {tree.size}, V] to match the tree, got {scores.shape}"
        )
    check_tree(tree, scores.shape[-1])


def _advance(path, depth, cur, take, i):
    """Move the rows with `take: [B]` to node i: append i to `path: [B, N]` at depth + 1."""
    slot = jnp.arange(path.shape[1])[None, :] == (depth + 1)[:, None]
    path = jnp.where(take[:, None] & slot, i, path)
    return path, depth + take.astype(jnp.int32), jnp.where(take, i, cur)


def accept_greedy(tree: DraftTree, logits: jax.Array) -> Acceptance:
    """The longest path from the root whose every token is the target's argmax at its parent.

    logits: [B, N, V] target logits at every node. Siblings are tried in index order, so of two
    children holding the argmax the first is taken; unused nodes are never taken. bonus: [B] the
    argmax at the last accepted node.
    """
    _check_scores(tree, logits, "logits")
    best = greedy_tokens(logits)  # [B, N]; the scan touches no [B, V] array
    batch, n = tree.tokens.shape

    def step(carry, i):
        cur, best_cur, path, depth = carry
        take = (tree.parents[:, i] == cur) & (tree.tokens[:, i] == best_cur)
        path, depth, cur = _advance(path, depth, cur, take, i)
        return (cur, jnp.where(take, best[:, i], best_cur), path, depth), None

    start = (jnp.zeros(batch, jnp.int32), best[:, 0], jnp.zeros((batch, n), jnp.int32), jnp.zeros(batch, jnp.int32))
    (_, bonus, path, depth), _ = jax.lax.scan(step, start, jnp.arange(1, n, dtype=jnp.int32))
    return Acceptance(path=path, accepted=depth, bonus=bonus)


def accept_sampling(tree: DraftTree, probs: jax.Array, key: jax.Array) -> Acceptance:
    """Recursive rejection sampling: the emitted tokens (accepted drafts, then the bonus) follow the
    target's distribution exactly.

    probs: [B, N, V] the target's (already filtered) distribution at every node; key: PRNG key.

    At the current node c with distribution p (first `probs[c]`), c's children x_1, x_2, ... are tried
    in index order. q_j, the law child j was drawn from given its earlier siblings, is one-hot(x_j)
    ("deterministic"), `child_probs[c]` ("independent"), or `child_probs[c]` renormalised over the
    tokens the earlier siblings took ("without_replacement"). x_j is accepted with probability
    min(1, p(x_j) / q_j(x_j)), and then the walk moves to node j with p = probs[j]; on rejection
    p <- normalise(max(p - q_j, 0)) and the next sibling is tried. When no child is accepted (or c has
    none), bonus ~ p.

    Why it is exact: the token emitted at c has law p. By induction over the siblings left: given the
    earlier ones were rejected, x_j ~ q_j (q_j depends only on earlier siblings, never on x_j), so x_j
    is emitted with law min(p, q_j), and with probability 1 - sum(min(p, q_j)) = sum(max(p - q_j, 0))
    the step is rejected and, by the induction hypothesis, emits a token of law normalise(max(p - q_j, 0));
    the sum is min(p, q_j) + max(p - q_j, 0) = p. After c has no child left, bonus ~ p directly.
    Once x_j is emitted the next token is conditioned on it, which is probs[j]. A token that an earlier
    deterministic sibling already offered has p = 0 on the residual, so it is never accepted twice.
    (Hence "deterministic" is exact for drafts of any law drawn independently of `key`, only accepted
    less often than when their law is recorded.)
    """
    _check_scores(tree, probs, "probs")
    batch, n, vocab = probs.shape
    draw = tree.draw
    tokens, parents = tree.tokens, tree.parents
    rows = jnp.arange(batch)
    u_key, bonus_key = jax.random.split(key)
    uniforms = jax.random.uniform(u_key, (n - 1, batch))  # one per draft node

    def node(scores, i):
        return jax.lax.dynamic_index_in_dim(scores, i, axis=1, keepdims=False).astype(jnp.float32)

    def step(carry, xs):
        i, u = xs
        cur, p, q, path, depth = carry
        child = parents[:, i] == cur
        tok = tokens[:, i]
        p_x = p[rows, tok]
        if draw == "deterministic":
            q_x = jnp.ones_like(p_x)
            residual = jnp.where(jnp.arange(vocab)[None, :] == tok[:, None], 0.0, p)
        else:
            # q carries child_probs[c], with the tokens of tried siblings zeroed for without_replacement.
            q_j = q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), 1e-30) if draw == "without_replacement" else q
            q_x = q_j[rows, tok]
            residual = jnp.maximum(p - q_j, 0.0)
        accept = child & (u * q_x < p_x)
        reject = child & ~accept
        # A residual of (numerically) zero mass means p == q_j, where rejection has probability ~0: keep p.
        mass = jnp.sum(residual, axis=-1, keepdims=True)
        residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
        p = jnp.where(accept[:, None], node(probs, i), jnp.where(reject[:, None], residual, p))
        if draw == "independent":
            q = jnp.where(accept[:, None], node(tree.child_probs, i), q)
        elif draw == "without_replacement":
            tried = q.at[rows, tok].set(0.0)
            q = jnp.where(accept[:, None], node(tree.child_probs, i), jnp.where(reject[:, None], tried, q))
        path, depth, cur = _advance(path, depth, cur, accept, i)
        return (cur, p, q, path, depth), None

    p0 = node(probs, 0)
    q0 = node(tree.child_probs, 0) if draw != "deterministic" else jnp.zeros((batch, 0), jnp.float32)
    start = (jnp.zeros(batch, jnp.int32), p0, q0, jnp.zeros((batch, n), jnp.int32), jnp.zeros(batch, jnp.int32))
    (_, p, _, path, depth), _ = jax.lax.scan(step, start, (jnp.arange(1, n, dtype=jnp.int32), uniforms))
    bonus = jax.random.categorical(bonus_key, jnp.log(p), axis=-1).astype(jnp.int32)
    return Acceptance(path=path, accepted=depth, bonus=bonus)


def target_probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The target's sampling distribution at every node: `sampling.probs`, the softmax of its filtered logits.

    logits: [B, N, V] -> [B, N, V] float32. A greedy `sampling` raises ValueError (greedy uses `accept_greedy`).
    """
    return sampling.probs(logits)
