"""The target side of a round, for every model family: score a draft tree in one forward, then keep
the accepted path. Attention models write the tree's K/V into the cache's free slots and attend with
the ancestor mask (`attention_tree`); state-space models keep one recurrent state per tree node
(`ssm_tree`). Draft models use the same two functions to grow and roll forward their own caches."""

from __future__ import annotations

import jax.numpy as jnp

from ssm_llm.models import family_of
from ssm_llm.speculative import attention_tree, ssm_tree

_VERIFIERS = {"attention": attention_tree, "ssm": ssm_tree}


def _family(config):
    """The tree verifier the model family registered for `config`."""
    family = family_of(config)
    if family.tree_verifier is None:
        raise ValueError(f"speculative decoding does not support {family.name} models ({type(config).__name__})")
    return _VERIFIERS[family.tree_verifier]


def scratch_is_cache(config) -> bool:
    """Whether `tree_logits`' scratch is the cache itself with the tree written into its free slots (attention
    models), rather than separate per-node states (state-space models)."""
    return _family(config) is attention_tree


def tree_logits(params, config, cache, tree, scratch=None, nodes=None, impl: str = "auto"):
    """Logits `[B, M, V]` of the tree nodes `nodes: [B, M]` (default all N) continuing each row of
    `cache`, and the scratch holding every node computed so far (pass it back to compute more nodes,
    then to `commit`). See `attention_tree.tree_logits` / `ssm_tree.tree_logits`."""
    return _family(config).tree_logits(params, config, cache, tree, scratch, nodes, impl)


def root_logits(params, config, cache, tree, impl: str = "auto"):
    """`tree_logits` of a round in which no active row has a draft: only the root is computed (one
    token's cost instead of N, through the same partial-call path draft models grow trees with), its
    logits padded to `[B, N, V]` so the result has the full call's shapes (the padding is never read)."""
    logits, scratch = tree_logits(params, config, cache, tree, nodes=jnp.zeros((tree.batch, 1), jnp.int32), impl=impl)
    return jnp.pad(logits, ((0, 0), (0, tree.size - 1), (0, 0))), scratch


def commit(config, cache, scratch, path, accepted, active=None):
    """`cache` advanced by each row's root and accepted path (`path: [B, N]`, `accepted: [B]`); rows with
    `active[b]` False are left unchanged."""
    return _family(config).commit(cache, scratch, path, accepted, active)
