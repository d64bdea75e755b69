"""Tree verification for Mamba-1 / Mamba-2 targets (`ssm_llm.speculative.ssm_tree`): per-node logits and the
committed cache equal plain `ssm_llm.forward` over the prefix and each node's ancestor path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm.speculative import ssm_tree, verify
from ssm_llm.speculative.tree import UNUSED, DraftTree, chain

VOCAB, N = 128, 8
SHARED = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, state_size=8)
CONFIGS = {
    "mamba1": ssm_llm.MambaConfig(**SHARED),
    "mamba2-g1": ssm_llm.Mamba2Config(**SHARED, num_heads=4, head_dim=16, n_groups=1, chunk_size=8),
    "mamba2-g2": ssm_llm.Mamba2Config(
        **SHARED, num_heads=4, head_dim=16, n_groups=2, chunk_size=8, time_step_limit=(0.0, 3.0)
    ),
}
VARIANTS = [("mamba1", True), ("mamba2-g1", False), ("mamba2-g2", True)]
PREFIX_LENGTHS = np.array([5, 2, 9])
# Per row: a branching tree with unused nodes (parents < index, unused nodes continue nothing).
BRANCH_PARENTS = np.array(
    [[-1, 0, 0, 1, 1, 2, UNUSED, 3], [-1, 0, 1, 2, 0, UNUSED, 4, UNUSED], [-1, 0, 0, 0, 3, 4, 1, 6]]
)

score = jax.jit(verify.tree_logits, static_argnames=("config", "impl"))


def sharpen(params):
    """Init-scale weights barely let tokens more than a few steps back move the logits (~1e-5, below the
    tolerances); larger projections, larger dt and slower decay make the whole prefix matter (~1e-2)."""
    layers = dict(params["layers"])
    for name in ("in_proj", "x_proj", "dt_proj", "conv_w", "out_proj"):
        if name in layers:
            layers[name] = layers[name] * 8.0
    for name in ("dt_bias", "dt_proj_b"):
        if name in layers:
            layers[name] = layers[name] + 3.0
    layers["A_log"] = layers["A_log"] + np.log(0.1)
    return {**params, "layers": layers}


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{n}-{'stacked' if s else 'unstacked'}" for n, s in VARIANTS])
def model(request):
    """(config, params, prefix cache of a ragged batch, rng)."""
    name, stacked = request.param
    config = CONFIGS[name]
    params = sharpen(ssm_llm.init_params(config, jax.random.PRNGKey(0)))
    if not stacked:
        params = ssm_llm.unstack_layers(params)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, VOCAB, (len(PREFIX_LENGTHS), PREFIX_LENGTHS.max()))
    _, cache = ssm_llm.forward(
        params,
        config,
        jnp.asarray(prompts),
        ssm_llm.init_cache(config, 3, 64),
        token_counts=jnp.asarray(PREFIX_LENGTHS),
    )
    return config, params, cache, rng


def ancestor_paths(parents):
    """[B, N, N] root-first token-index paths to each node (padded with 0) and [B, N] their lengths."""
    batch, n = parents.shape
    paths, lengths = np.zeros((batch, n, n), np.int64), np.zeros((batch, n), np.int64)
    for b in range(batch):
        for i in range(n):
            walk, node = [], i
            while node >= 0:
                walk.append(node)
                node = parents[b, node] if node else -1
            paths[b, i, : len(walk)] = walk[::-1]
            lengths[b, i] = len(walk)
    return paths, lengths


def forward_paths(params, config, cache, tokens, lengths):
    """Plain forward from `cache` over `tokens: [B, T]` (first `lengths[b]` real): (last real logits [B, V], cache)."""
    logits, new = ssm_llm.forward(params, config, jnp.asarray(tokens), cache, token_counts=jnp.asarray(lengths))
    return np.asarray(logits)[np.arange(len(lengths)), np.asarray(lengths) - 1], new


def branch_tree(rng):
    return DraftTree(
        jnp.asarray(rng.integers(0, VOCAB, BRANCH_PARENTS.shape), jnp.int32), jnp.asarray(BRANCH_PARENTS, jnp.int32)
    )


def assert_cache_close(got, want, rows=slice(None)):
    for name in ("ssm_state", "conv_state"):
        np.testing.assert_allclose(
            np.asarray(getattr(got, name))[:, rows], np.asarray(getattr(want, name))[:, rows], atol=1e-5, rtol=0
        )
    np.testing.assert_array_equal(np.asarray(got.lengths)[rows], np.asarray(want.lengths)[rows])


def test_chain_equals_decoding_one_by_one(model):
    config, params, cache, rng = model
    tokens = rng.integers(0, VOCAB, (3, N))
    logits, _ = score(params, config, cache, chain(jnp.asarray(tokens[:, 0]), jnp.asarray(tokens[:, 1:])))
    assert logits.shape == (3, N, VOCAB)
    step_cache, expected = cache, []
    for i in range(N):
        step_logits, step_cache = ssm_llm.forward(params, config, jnp.asarray(tokens[:, i : i + 1]), step_cache)
        expected.append(np.asarray(step_logits[:, 0]))
    np.testing.assert_allclose(np.asarray(logits), np.stack(expected, axis=1), atol=1e-4, rtol=0)
    # The prefix matters far beyond the conv window, so matching means the cached states were used.
    blank = ssm_llm.SSMCache(jnp.zeros_like(cache.conv_state), jnp.zeros_like(cache.ssm_state), cache.lengths)
    blank_logits, _ = score(params, config, blank, chain(jnp.asarray(tokens[:, 0]), jnp.asarray(tokens[:, 1:])))
    assert np.abs(np.asarray(blank_logits) - np.asarray(logits))[:, -1].max() > 1e-3


def test_branching_tree_equals_forward_over_each_ancestor_path(model):
    config, params, cache, rng = model
    tree = branch_tree(rng)
    logits, _ = score(params, config, cache, tree)
    paths, lengths = ancestor_paths(BRANCH_PARENTS)
    tokens = np.asarray(tree.tokens)
    for i in range(N):
        path_tokens = np.take_along_axis(tokens, paths[:, i], axis=1)
        expected, _ = forward_paths(params, config, cache, path_tokens, lengths[:, i])
        used = BRANCH_PARENTS[:, i] != UNUSED
        np.testing.assert_allclose(np.asarray(logits[:, i])[used], expected[used], atol=1e-4, rtol=0)


def test_calls_over_parts_of_the_tree_equal_one_call(model):
    config, params, cache, rng = model
    tree = branch_tree(rng)
    full_logits, full_scratch = score(params, config, cache, tree)
    # Two calls; rows list different nodes, each with its parent in the first call or earlier in its own.
    calls = [np.array([[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 3, 6]]), np.array([[4, 5, 6, 7], [3, 5, 6, 7], [2, 4, 5, 7]])]
    scratch = None
    for nodes in calls:
        logits, scratch = score(params, config, cache, tree, scratch, jnp.asarray(nodes, jnp.int32))
        np.testing.assert_allclose(
            np.asarray(logits), np.take_along_axis(np.asarray(full_logits), nodes[..., None], 1), atol=1e-6, rtol=0
        )
    np.testing.assert_allclose(np.asarray(scratch.ssm_states), np.asarray(full_scratch.ssm_states), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(scratch.conv_inputs), np.asarray(full_scratch.conv_inputs), atol=1e-6, rtol=0)


def test_commit_chain_equals_forward_of_accepted_tokens(model):
    config, params, cache, rng = model
    tokens = rng.integers(0, VOCAB, (3, N))
    _, scratch = score(params, config, cache, chain(jnp.asarray(tokens[:, 0]), jnp.asarray(tokens[:, 1:])))
    path = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (3, N))
    bonus = jnp.asarray(rng.integers(0, VOCAB, (3, 1)))
    for accepted in ([0, 3, N - 1], [0, 0, 0], [N - 1] * 3):
        accepted = np.asarray(accepted)
        committed = ssm_tree.commit(cache, scratch, path, jnp.asarray(accepted, jnp.int32))
        _, expected = forward_paths(params, config, cache, tokens, accepted + 1)
        assert_cache_close(committed, expected)
        np.testing.assert_array_equal(np.asarray(committed.lengths), PREFIX_LENGTHS + 1 + accepted)
        next_logits, _ = ssm_llm.forward(params, config, bonus, committed)
        expected_logits, _ = ssm_llm.forward(params, config, bonus, expected)
        np.testing.assert_allclose(np.asarray(next_logits), np.asarray(expected_logits), atol=1e-4, rtol=0)
    partial = jax.jit(ssm_tree.commit)(
        cache, scratch, path, jnp.asarray([2, 5, 1], jnp.int32), jnp.asarray([True, False, True])
    )
    _, expected = forward_paths(params, config, cache, tokens, np.array([3, 6, 2]))
    assert_cache_close(partial, expected, rows=[0, 2])
    for name in ("conv_state", "ssm_state"):
        np.testing.assert_array_equal(np.asarray(getattr(partial, name))[:, 1], np.asarray(getattr(cache, name))[:, 1])
    assert int(partial.lengths[1]) == PREFIX_LENGTHS[1]


def test_commit_branch_path(model):
    config, params, cache, rng = model
    tree = branch_tree(rng)
    _, scratch = score(params, config, cache, tree)
    path = np.array([[0, 1, 3, 7, 0, 0, 0, 0], [0, 4, 6, 0, 0, 0, 0, 0], [0, 3, 0, 0, 0, 0, 0, 0]])
    accepted = np.array([3, 2, 1])
    committed = ssm_tree.commit(cache, scratch, jnp.asarray(path, jnp.int32), jnp.asarray(accepted, jnp.int32))
    _, expected = forward_paths(
        params, config, cache, np.take_along_axis(np.asarray(tree.tokens), path, 1), accepted + 1
    )
    assert_cache_close(committed, expected)


def test_interpret_kernels_equal_xla():
    config = CONFIGS["mamba2-g2"]
    params = sharpen(ssm_llm.init_params(config, jax.random.PRNGKey(2)))
    rng = np.random.default_rng(3)
    prompts = jnp.asarray(rng.integers(0, VOCAB, (2, 4)))
    _, cache = ssm_llm.forward(params, config, prompts, ssm_llm.init_cache(config, 2, 8))
    tree = DraftTree(
        jnp.asarray(rng.integers(0, VOCAB, (2, 4)), jnp.int32),
        jnp.asarray([[-1, 0, 0, 1], [-1, 0, 1, UNUSED]], jnp.int32),
    )
    xla, xla_scratch = score(params, config, cache, tree, impl="xla")
    interpret, interpret_scratch = score(params, config, cache, tree, impl="interpret")
    np.testing.assert_allclose(np.asarray(interpret), np.asarray(xla), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(interpret_scratch.ssm_states), np.asarray(xla_scratch.ssm_states), atol=1e-5, rtol=0
    )


def test_errors():
    config = CONFIGS["mamba1"]
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    cache = ssm_llm.init_cache(config, 3, 8)
    tree = chain(jnp.zeros((3,), jnp.int32), jnp.ones((3, 2), jnp.int32))
    attention = ssm_llm.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    with pytest.raises(TypeError, match="SSMCache"):
        ssm_tree.tree_logits(params, config, ssm_llm.init_cache(attention, 3, 8), tree)
    with pytest.raises(ValueError, match="tree batch 2 != cache batch 3"):
        ssm_tree.tree_logits(params, config, cache, chain(jnp.zeros((2,), jnp.int32), jnp.ones((2, 2), jnp.int32)))
    with pytest.raises(ValueError, match="nodes must be increasing"):
        ssm_tree.tree_logits(params, config, cache, tree, nodes=jnp.asarray([[1, 0]] * 3))
    with pytest.raises(ValueError, match="scratch shapes"):
        ssm_tree.tree_logits(params, config, cache, tree, ssm_tree.init_scratch(cache, 5))
    scratch = ssm_tree.init_scratch(cache, 3)
    with pytest.raises(TypeError, match="SSMCache"):
        ssm_tree.commit(scratch, scratch, jnp.zeros((3, 3), jnp.int32), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="accepted must lie in"):
        ssm_tree.commit(cache, scratch, jnp.zeros((3, 3), jnp.int32), jnp.asarray([0, 3, 0]))
