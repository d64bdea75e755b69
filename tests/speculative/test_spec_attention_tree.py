"""Tree verification for attention models: tree logits equal plain decoding along each node's path, the
level-by-level computation equals one full call, and commit leaves the cache plain decoding would."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm.kv.policy import CompressedCache
from ssm_llm.kv.streaming_llm import StreamingLLM
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.speculative import attention_tree
from ssm_llm.speculative.tree import UNUSED, DraftTree, chain

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": ssm_llm.ModelConfig(**BASE),
    "qwen2": ssm_llm.ModelConfig(**BASE, qkv_bias=True, tie_word_embeddings=True, model_type="qwen2"),
    # Windows shorter than prefix + tree depth, so the window cuts both prefix and tree keys.
    "mistral": ssm_llm.ModelConfig(**BASE, layer_windows=(3, 6), model_type="mistral"),
}
CASES = [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)]
PREFIX = np.array([5, 9, 2])
MAX_LEN = 24
U = UNUSED
# Same topology in every row (so a level is the same node indices everywhere), some nodes unused per row.
PARENTS = np.array([[-1, 0, 0, 1, 1, 2, 2, 3], [-1, 0, 0, 1, U, 2, U, 3], [-1, 0, U, 1, 1, U, U, U]], np.int32)
LEVELS = ([0], [1, 2], [3, 4, 5, 6], [7])

tree_logits = jax.jit(attention_tree.tree_logits, static_argnames=("config", "impl"))


def make_params(config, unstacked, seed=0):
    """Random params with weights widened (std 0.2) so logits differ clearly between positions."""
    params = ssm_llm.init_params(config, jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else 10.0 * x, params
    )
    return unstack_layers(params) if unstacked else params


def prefill(params, config, max_len=MAX_LEN, seed=1):
    """A cache holding a random prefix of PREFIX[b] tokens per row (right-padded prefill)."""
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (len(PREFIX), PREFIX.max()), 0, config.vocab_size)
    cache = ssm_llm.init_cache(config, len(PREFIX), max_len)
    _, cache = ssm_llm.forward(params, config, tokens, cache, token_counts=jnp.asarray(PREFIX), impl="xla")
    return cache


def branching_tree(config, seed=2):
    tokens = np.array(jax.random.randint(jax.random.PRNGKey(seed), PARENTS.shape, 0, config.vocab_size))
    tokens[PARENTS == UNUSED] = 0
    return DraftTree(jnp.asarray(tokens, jnp.int32), jnp.asarray(PARENTS))


def ancestor_path(parents, i):
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def path_logits(params, config, cache, tree):
    """[B, N, V] reference: node i's logits from plain `forward` over prefix + the path root..i."""
    parents, tokens = np.asarray(tree.parents), np.asarray(tree.tokens)
    batch, n = parents.shape
    out = np.zeros((batch, n, config.vocab_size), np.float32)
    for i in range(n):
        paths = [ancestor_path(parents[b], i) if parents[b, i] != UNUSED else [0] for b in range(batch)]
        padded = np.zeros((batch, n), np.int32)
        for b, path in enumerate(paths):
            padded[b, : len(path)] = tokens[b, path]
        counts = jnp.asarray([len(p) for p in paths], jnp.int32)
        logits, _ = ssm_llm.forward(params, config, padded, cache, token_counts=counts, impl="xla")
        out[:, i] = np.asarray(logits)[np.arange(batch), counts - 1]
    return out


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{'unstacked' if u else 'stacked'}" for n, u in CASES])
def model(request):
    name, unstacked = request.param
    config = CONFIGS[name]
    params = make_params(config, unstacked)
    return config, params, prefill(params, config)


def test_chain_matches_one_by_one_decoding(model):
    config, params, cache = model
    k = 5
    tokens = jax.random.randint(jax.random.PRNGKey(3), (len(PREFIX), k + 1), 0, config.vocab_size)
    tree = chain(tokens[:, 0], tokens[:, 1:])
    logits, scratch = tree_logits(params, config, cache, tree, impl="xla")
    assert logits.shape == (len(PREFIX), k + 1, config.vocab_size)
    np.testing.assert_array_equal(scratch.lengths, cache.lengths)
    plain = cache
    for t in range(k + 1):
        expected, plain = ssm_llm.forward(params, config, tokens[:, t : t + 1], plain, impl="xla")
        np.testing.assert_allclose(logits[:, t], expected[:, 0], atol=1e-5, rtol=0)
    # A chain's tree slots are the plain cache's slots: same K/V.
    for b, length in enumerate(PREFIX):
        np.testing.assert_allclose(scratch.k[:, b, :, : length + k + 1], plain.k[:, b, :, : length + k + 1], atol=1e-5)
        np.testing.assert_allclose(scratch.v[:, b, :, : length + k + 1], plain.v[:, b, :, : length + k + 1], atol=1e-5)


def test_branching_tree_matches_each_ancestor_path(model):
    config, params, cache = model
    tree = branching_tree(config)
    logits, _ = tree_logits(params, config, cache, tree, impl="xla")
    expected = path_logits(params, config, cache, tree)
    used = np.asarray(tree.used)
    np.testing.assert_allclose(np.asarray(logits)[used], expected[used], atol=1e-5, rtol=0)
    # Unused nodes are invisible: changing their tokens changes no used node's logits.
    other = tree.replace(tokens=jnp.where(tree.used, tree.tokens, 77))
    np.testing.assert_array_equal(
        np.asarray(tree_logits(params, config, cache, other, impl="xla")[0])[used], np.asarray(logits)[used]
    )


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_level_by_level_equals_one_full_call(name):
    config = CONFIGS[name]
    params = make_params(config, False)
    cache = prefill(params, config)
    tree = branching_tree(config)
    full, full_scratch = tree_logits(params, config, cache, tree, impl="xla")
    scratch = cache  # (not None: the first and last levels then share one compiled shape)
    for level in LEVELS:
        nodes = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (len(PREFIX), len(level)))
        logits, scratch = tree_logits(params, config, cache, tree, scratch, nodes, impl="xla")
        used = np.asarray(tree.used)[:, level]
        np.testing.assert_allclose(np.asarray(logits)[used], np.asarray(full)[:, level][used], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(scratch.lengths, cache.lengths)
    for b, length in enumerate(PREFIX):
        slots = length + np.flatnonzero(np.asarray(tree.used)[b])
        np.testing.assert_allclose(scratch.k[:, b, :, slots], full_scratch.k[:, b, :, slots], atol=1e-5)
        np.testing.assert_allclose(scratch.v[:, b, :, slots], full_scratch.v[:, b, :, slots], atol=1e-5)


def test_eager_call_equals_jitted():
    config = CONFIGS["qwen2"]
    params = make_params(config, False)
    cache = prefill(params, config)
    tree = branching_tree(config)
    eager, _ = attention_tree.tree_logits(params, config, cache, tree, impl="xla")
    jitted, _ = tree_logits(params, config, cache, tree, impl="xla")
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_commit_equals_plain_decoding_of_the_accepted_path(name):
    config = CONFIGS[name]
    params = make_params(config, False)
    cache = prefill(params, config)
    tree = branching_tree(config)
    _, scratch = tree_logits(params, config, cache, tree, impl="xla")
    path = jnp.asarray([[0, 2, 6, 0, 0, 0, 0, 0], [0, 1, 3, 7, 0, 0, 0, 0], [0, 1, 4, 0, 0, 0, 0, 0]], jnp.int32)
    accepted = jnp.asarray([2, 3, 0], jnp.int32)
    active = jnp.asarray([True, True, False])
    committed = attention_tree.commit(cache, scratch, path, accepted, active)
    for check_active, result in ((active, committed), (None, attention_tree.commit(cache, scratch, path, accepted))):
        counts = (1 + accepted) if check_active is None else jnp.where(active, 1 + accepted, 0)
        kept = np.take_along_axis(np.asarray(tree.tokens), np.asarray(path[:, :4]), axis=1)
        logits_ref, plain = ssm_llm.forward(params, config, kept, cache, token_counts=counts, impl="xla")
        np.testing.assert_array_equal(result.lengths, PREFIX + np.asarray(counts))
        for b in range(len(PREFIX)):
            end = int(result.lengths[b])
            np.testing.assert_allclose(result.k[:, b, :, :end], plain.k[:, b, :, :end], atol=1e-5, rtol=0)
            np.testing.assert_allclose(result.v[:, b, :, :end], plain.v[:, b, :, :end], atol=1e-5, rtol=0)
        # One more decode step from the committed cache equals one from the plain cache.
        nxt = jnp.asarray([[11], [22], [33]], jnp.int32)
        got, _ = ssm_llm.forward(params, config, nxt, result, impl="xla")
        want, _ = ssm_llm.forward(params, config, nxt, plain, impl="xla")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The inactive row is unchanged where it is visible.
    np.testing.assert_array_equal(committed.k[:, 2, :, : PREFIX[2]], cache.k[:, 2, :, : PREFIX[2]])
    np.testing.assert_array_equal(committed.v[:, 2, :, : PREFIX[2]], cache.v[:, 2, :, : PREFIX[2]])


def test_commit_under_jit():
    config = CONFIGS["llama"]
    params = make_params(config, False)
    cache = prefill(params, config)
    tree = branching_tree(config)
    _, scratch = tree_logits(params, config, cache, tree, impl="xla")
    path = jnp.asarray([[0, 1, 3, 7, 0, 0, 0, 0]] * 3, jnp.int32)
    accepted = jnp.asarray([3, 1, 2], jnp.int32)
    eager = attention_tree.commit(cache, scratch, path, accepted)
    jitted = jax.jit(attention_tree.commit)(cache, scratch, path, accepted)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_interpret_kernel_matches_xla():
    config = CONFIGS["llama"]
    params = make_params(config, False)
    cache = prefill(params, config)
    tree = branching_tree(config)
    ref, ref_scratch = tree_logits(params, config, cache, tree, impl="xla")
    got, got_scratch = tree_logits(params, config, cache, tree, impl="interpret")
    used = np.asarray(tree.used)
    np.testing.assert_allclose(np.asarray(got)[used], np.asarray(ref)[used], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_scratch.k, ref_scratch.k, atol=1e-5, rtol=0)


def test_errors():
    config = CONFIGS["llama"]
    params = make_params(config, False)
    tree = branching_tree(config)
    small = prefill(params, config, max_len=12)  # row 1 holds 9 tokens: no room for 8 nodes
    with pytest.raises(ValueError, match="row 1 holds 9 tokens.*max_len 12"):
        attention_tree.tree_logits(params, config, small, tree)
    compressed = CompressedCache(
        data=None, lengths=jnp.asarray(PREFIX), used=jnp.asarray(PREFIX), policy=StreamingLLM(budget=8), capacity=8
    )
    with pytest.raises(TypeError, match="CompressedCache"):
        attention_tree.tree_logits(params, config, compressed, tree)
    cache = prefill(params, config)
    with pytest.raises(ValueError, match="strictly increasing"):
        attention_tree.tree_logits(params, config, cache, tree, nodes=jnp.asarray([[2, 1]] * 3))
    with pytest.raises(ValueError, match="tree batch 2 != cache batch 3"):
        attention_tree.tree_logits(params, config, cache, DraftTree(tree.tokens[:2], tree.parents[:2]))
    wrong = ssm_llm.init_cache(ssm_llm.ModelConfig(**{**BASE, "num_kv_heads": 4}), 3, MAX_LEN)
    with pytest.raises(ValueError, match="cache k/v must be"):
        attention_tree.tree_logits(params, config, wrong, tree)
    with pytest.raises(ValueError, match="accepted must lie in"):
        attention_tree.commit(cache, cache, jnp.zeros((3, 8), jnp.int32), jnp.asarray([0, 8, 0]))
    with pytest.raises(TypeError, match="CompressedCache"):
        attention_tree.commit(compressed, cache, jnp.zeros((3, 8), jnp.int32), jnp.asarray([0, 1, 0]))
