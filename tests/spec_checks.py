"""Shared pieces of the speculative decoding tests: tiny targets with well-separated logits, a random
test drafter, and the exact-equality check against plain greedy decoding."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import ssm_llm
from ssm_llm.speculative.tree import UNUSED, DraftTree


def wide_params(config, seed: int = 0, scale: float = 6.0):
    """Random params with matrices scaled up so logits are far from ties (greedy comparisons are robust)."""
    params = ssm_llm.init_params(config, jax.random.PRNGKey(seed))

    def widen(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim >= 2 and not any(s in name for s in ("A_log", "norm", "conv")):
            return x * scale
        return x

    return jax.tree_util.tree_map_with_path(widen, params)


LLAMA = ssm_llm.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
MAMBA2 = ssm_llm.Mamba2Config(
    vocab_size=64,
    hidden_size=32,
    state_size=8,
    num_layers=2,
    intermediate_size=64,
    num_heads=4,
    head_dim=16,
    n_groups=1,
    chunk_size=8,
)
MAMBA1 = ssm_llm.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_layers=2, intermediate_size=64)


@flax.struct.dataclass
class RandomTreeDrafter:
    """A test drafter: a fixed random tree shape with random tokens (or, with `copy`, tokens copied from
    the history so some are accepted). draw "deterministic", or "independent" with uniform-ish random
    child laws from which the children are really sampled."""

    vocab_size: int = flax.struct.field(pytree_node=False)
    parents: tuple = flax.struct.field(pytree_node=False, default=(-1, 0, 0, 1, 1, 2, 3, 5))
    draw: str = flax.struct.field(pytree_node=False, default="deterministic")

    @property
    def tree_size(self) -> int:
        return len(self.parents)

    def init(self, params, config, prompts, lengths, max_len, impl):
        return ()

    def propose(self, state, context, sampling, key):
        batch, n = context.lengths.shape[0], self.tree_size
        root = jnp.take_along_axis(context.history, (context.lengths - 1)[:, None], axis=1)[:, 0]
        k_tok, k_use, k_probs = jax.random.split(key, 3)
        parents = jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (batch, n))
        drop = jax.random.bernoulli(k_use, 0.15, (batch, n)).at[:, 0].set(False)
        # Drop a node and, through the parent chain, its subtree (parents come first).
        used = ~drop
        for i in range(1, n):
            used = used.at[:, i].set(used[:, i] & used[:, self.parents[i]])
        parents = jnp.where(used, parents, UNUSED)
        if self.draw == "deterministic":
            tokens = jax.random.randint(k_tok, (batch, n), 0, self.vocab_size)
            return DraftTree(tokens.at[:, 0].set(root).astype(jnp.int32), parents), state
        logits = 2.0 * jax.random.normal(k_probs, (batch, n, self.vocab_size))
        probs = jax.nn.softmax(logits, axis=-1)
        parent_probs = jnp.take_along_axis(probs, jnp.maximum(parents, 0)[:, :, None], axis=1)
        tokens = jax.random.categorical(k_tok, jnp.log(parent_probs), axis=-1)
        return DraftTree(tokens.at[:, 0].set(root).astype(jnp.int32), parents, probs, "independent"), state

    def update(self, state, context, tree, logits, acceptance):
        return state


def assert_same_greedy(params, config, prompts, drafter, max_new_tokens=12, **kw):
    """Speculative greedy generation gives exactly plain greedy's tokens and finish reasons."""
    plain = ssm_llm.generate(params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=max_new_tokens, **kw))
    spec = ssm_llm.generate(
        params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=max_new_tokens, speculative=drafter, **kw)
    )
    assert spec.tokens == plain.tokens
    assert spec.finish_reasons == plain.finish_reasons
    assert spec.speculative is not None and len(spec.speculative.rounds) == len(prompts)
    return spec


def ragged_prompts(rng: np.random.Generator, vocab: int, lengths=(5, 11, 2)) -> list[list[int]]:
    return [rng.integers(0, vocab, n).tolist() for n in lengths]
