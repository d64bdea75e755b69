"""Draft models: a smaller model of any family (attention, Mamba, Mamba-2) with the target's vocabulary,
or the target itself with some layers skipped (self-speculative decoding), proposes a chain of drafts.

A draft model grows its tree with the same two functions the target verifies with
(`verify.tree_logits`, one call per level) and rolls its own cache forward after verification
(`verify.commit`). Its state is `DraftModelState`: its cache, which holds each row's committed tokens
except the root (as the target's does), and the scratch of the last proposal. This module also holds
the pieces RSD and DySpec (`rsd.py`, `dyspec.py`) share with `DraftModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import is_stacked
from ssm_llm.model import forward, init_cache
from ssm_llm.option_spec import check_int
from ssm_llm.sampling import Sampling
from ssm_llm.speculative import verify
from ssm_llm.speculative.in_place import cond_in_place
from ssm_llm.speculative.protocol import Acceptance, DraftContext
from ssm_llm.speculative.tree import MAX_TREE_NODES, ROOT_PARENT, TREE_BOUND, UNUSED, DraftTree
from ssm_llm.ssm_config import Mamba2Config, MambaConfig


@flax.struct.dataclass
class DraftModelState:
    """cache: the draft model's cache (each row's committed tokens except the root); scratch: the nodes the
    last `propose` computed (`verify.tree_logits`' scratch), for `update` to commit; impl: the kernel choice.

    An attention draft's scratch is its cache with the tree's K/V in the slots past each row's length
    (`attention_tree`), invisible to everything else, so the state keeps that one buffer as `cache` and
    `scratch` is None: the draft's KV memory is not doubled. A state-space draft's scratch holds per-node
    states beside the cache.
    """

    cache: object
    scratch: object
    impl: str = flax.struct.field(pytree_node=False, default="auto")

    def with_scratch(self, config, scratch) -> DraftModelState:
        """The state holding a new proposal's scratch."""
        return self.replace(cache=scratch) if verify.scratch_is_cache(config) else self.replace(scratch=scratch)

    def tree_scratch(self, config):
        """The scratch of the last proposal, to pass back to `verify`."""
        return self.cache if verify.scratch_is_cache(config) else self.scratch


def check_draft_config(owner: str, config) -> None:
    """A clear error unless `config` is a float model's config that draft trees can grow on."""
    if getattr(config, "family", None) == "quamba":
        raise ValueError(
            f"{owner}: a quantized (Quamba) draft model is not supported: draft trees keep one float "
            f"recurrent state per node, which the quantized blocks do not run on; draft with the "
            f"float model (its params and config from before quantize_model)"
        )
    if not isinstance(config, (ModelConfig, MambaConfig, Mamba2Config)):
        raise TypeError(
            f"{owner}: config must be a ModelConfig, MambaConfig or Mamba2Config, got {type(config).__name__}"
        )


def self_speculative(params: dict, config, layers: Sequence[int]):
    """The target restricted to the layers `layers` (sorted, unique, in range), as `(params, config)` of a
    draft model: SkipDecode-style self-speculative decoding, no second set of weights.

    Works for every family and both layer layouts (stacked `[L, ...]` arrays or a list of layer dicts);
    per-layer config fields (attention `layer_windows`) are sliced with the layers."""
    check_draft_config("self_speculative", config)
    keep = list(layers)
    count = config.num_layers
    if not keep:
        raise ValueError("layers to keep must not be empty")
    if any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) for i in keep):
        raise ValueError(f"layers to keep must be ints, got {keep}")
    if keep != sorted(set(keep)):
        raise ValueError(f"layers to keep must be sorted and unique, got {keep}")
    if keep[0] < 0 or keep[-1] >= count:
        raise ValueError(f"layers to keep must lie in [0, {count}), got {keep}")
    if is_stacked(params):
        index = np.asarray(keep)
        kept = jax.tree_util.tree_map(lambda x: x[index], params["layers"])
    else:
        kept = [params["layers"][i] for i in keep]
    changes = {"num_layers": len(keep)}
    if isinstance(config, ModelConfig):
        changes["layer_windows"] = tuple(config.layer_windows[i] for i in keep)
    return {**params, "layers": kept}, dataclasses.replace(config, **changes)


def prefill_draft(
    params: dict, config, target_config, prompts: jax.Array, lengths: jax.Array, max_len: int, tree_size: int, impl: str
) -> DraftModelState:
    """The draft model's state after prefilling `prompts: [B, T]` (right-padded, `lengths: [B]`): a cache
    of `max_len + tree_size` slots holding the prompts, and (state-space drafts) a zero scratch shaped like
    a proposal's."""
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({config.vocab_size} tokens) must be the target's "
            f"({target_config.vocab_size} tokens)"
        )
    batch = prompts.shape[0]
    cache = init_cache(config, batch, max_len + tree_size)
    _, cache = forward(params, config, prompts, cache, token_counts=lengths, impl=impl)
    if verify.scratch_is_cache(config):
        return DraftModelState(cache, None, impl)
    # The speculative loop carries the state through `lax.while_loop`, so the scratch must exist, with
    # the shapes a proposal gives it, before the first round.
    tree = DraftTree(
        jnp.zeros((batch, tree_size), jnp.int32),
        jnp.full((batch, tree_size), UNUSED, jnp.int32).at[:, 0].set(ROOT_PARENT),
    )
    nodes = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda c: verify.tree_logits(params, config, c, tree, None, nodes, impl)[1], cache)
    scratch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return DraftModelState(cache, scratch, impl)


def commit_draft(
    params: dict,
    config,
    state: DraftModelState,
    tree: DraftTree,
    acceptance: Acceptance,
    active: jax.Array,
    computed: int,
) -> DraftModelState:
    """`state` with its cache advanced by each active row's root and accepted drafts.

    `computed` (static): the proposal computed nodes 0..computed-1. When a row accepted a node past them
    (a leaf, which the draft never needed to expand), that node is computed here first, so that
    proposing never pays for leaves that are usually rejected.
    """
    batch = tree.batch
    last = acceptance.path[jnp.arange(batch), acceptance.accepted]
    missing = active & (last >= computed)
    # Rows that need nothing list their root again; recomputing a node rewrites the same values.
    nodes = jnp.where(missing, last, 0)[:, None]
    in_cache = verify.scratch_is_cache(config)
    scratch = cond_in_place(
        jnp.any(missing),
        # (a scratch that is the cache itself is passed as both: capturing state.cache too would make XLA copy it)
        lambda s: verify.tree_logits(params, config, s if in_cache else state.cache, tree, s, nodes, state.impl)[1],
        lambda s: s,
        state.tree_scratch(config),
    )
    cache = verify.commit(config, state.cache, scratch, acceptance.path, acceptance.accepted, active)
    return state.replace(cache=cache)


def roots(context: DraftContext) -> jax.Array:
    """[B] int32: each row's last committed token (the root of its next tree)."""
    last = jnp.maximum(context.lengths - 1, 0)
    return jnp.take_along_axis(context.history, last[:, None], axis=1)[:, 0].astype(jnp.int32)


def draft_probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The draft's law `[..., V]` float32: softmax at the target's temperature (temperature 1 when greedy)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits if sampling.greedy else logits / sampling.temperature, axis=-1)


def ranked_children(logits: jax.Array, sampling: Sampling, key: jax.Array, count: int) -> jax.Array:
    """[..., count] int32: the children of nodes with draft `logits: [..., V]`, in sibling order.

    Greedy: the `count` most probable tokens. Sampling: `count` draws without replacement from the
    softmax at the temperature (Gumbel-top-k: perturb the scaled logits with Gumbel noise and take the
    best `count` in order), so the k-th child's law is the draft law renormalised over the tokens the
    earlier children did not take."""
    scores = logits.astype(jnp.float32)
    if not sampling.greedy:
        scores = scores / sampling.temperature + jax.random.gumbel(key, scores.shape, jnp.float32)
    return jax.lax.top_k(scores, count)[1].astype(jnp.int32)


class ModelDrafter:
    """What the drafters that run a draft model (`self.params`, `self.config`) share: `init` prefills its
    cache with the prompts; `update` rolls it forward by each active row's root and accepted drafts.
    A subclass gives `tree_size`, `propose` and `computed_nodes` (its proposals compute nodes
    0..computed_nodes-1; later ones are leaves the draft never expands)."""

    def init(
        self, params: dict, config, prompts: jax.Array, lengths: jax.Array, max_len: int, impl: str = "auto"
    ) -> DraftModelState:
        """Prefill the draft model with the prompts (`params`, `config`: the target's, for the vocabulary check)."""
        return prefill_draft(self.params, self.config, config, prompts, lengths, max_len, self.tree_size, impl)

    def update(
        self, state: DraftModelState, context: DraftContext, tree: DraftTree, logits: jax.Array, acceptance: Acceptance
    ) -> DraftModelState:
        """Roll the draft cache forward by each active row's root and accepted drafts."""
        del logits
        return commit_draft(self.params, self.config, state, tree, acceptance, context.active, self.computed_nodes)


@flax.struct.dataclass
class DraftModel(ModelDrafter):
    """A chain of `num_tokens` drafts from a draft model (`params`, `config`: any family, the target's
    vocabulary): draft d+1 is drawn from the draft's distribution after draft d (greedy: its argmax, draw
    "deterministic"; sampling: a draw at the target's temperature, draw "independent", the law recorded
    in `child_probs`). One `verify.tree_logits` call per draft."""

    params: dict
    config: object = flax.struct.field(pytree_node=False)
    num_tokens: int = flax.struct.field(pytree_node=False, default=4)

    def __post_init__(self):
        check_draft_config("DraftModel", self.config)
        check_int("DraftModel", "num_tokens", self.num_tokens, 1, MAX_TREE_NODES - 1, TREE_BOUND)

    @classmethod
    def skip_layers(cls, params: dict, config, keep: Sequence[int], num_tokens: int = 4) -> DraftModel:
        """Self-speculative drafting: the target (`params`, `config`) running only the layers `keep`."""
        draft_params, draft_config = self_speculative(params, config, keep)
        return cls(draft_params, draft_config, num_tokens)

    @property
    def tree_size(self) -> int:
        return self.num_tokens + 1

    @property
    def computed_nodes(self) -> int:
        return self.num_tokens  # the last draft is a leaf

    def propose(
        self, state: DraftModelState, context: DraftContext, sampling: Sampling, key: jax.Array
    ) -> tuple[DraftTree, DraftModelState]:
        """A chain tree `[B, num_tokens + 1]` rooted at each row's last committed token."""
        batch, size = context.lengths.shape[0], self.tree_size
        tokens = jnp.zeros((batch, size), jnp.int32).at[:, 0].set(roots(context))
        parents = jnp.full((batch, size), UNUSED, jnp.int32).at[:, 0].set(ROOT_PARENT)
        probs = None if sampling.greedy else jnp.zeros((batch, size, self.config.vocab_size), jnp.float32)

        def level(d, tokens, parents, probs, scratch):
            """Compute node d, draw node d + 1 from its logits."""
            nodes = jnp.full((batch, 1), d, jnp.int32)
            logits, scratch = verify.tree_logits(
                self.params, self.config, state.cache, DraftTree(tokens, parents), scratch, nodes, state.impl
            )
            child = ranked_children(logits[:, 0], sampling, jax.random.fold_in(key, d), 1)[:, 0]
            tokens = jax.lax.dynamic_update_slice(tokens, child[:, None], (0, d + 1))
            parents = jax.lax.dynamic_update_slice(parents, jnp.full((batch, 1), d, jnp.int32), (0, d + 1))
            if probs is not None:
                probs = jax.lax.dynamic_update_slice(probs, draft_probs(logits, sampling), (0, d, 0))
            return tokens, parents, probs, scratch

        # The root's call creates the scratch; the other levels share one traced body.
        carry = level(0, tokens, parents, probs, None)
        tokens, parents, probs, scratch = jax.lax.fori_loop(1, self.num_tokens, lambda d, c: level(d, *c), carry)
        tree = DraftTree(tokens, parents, probs, "deterministic" if sampling.greedy else "independent")
        return tree, state.with_scratch(self.config, scratch)
