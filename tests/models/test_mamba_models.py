"""Mamba / Mamba-2: logits and greedy-token parity with transformers, cached decode, ragged batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_greedy, hf_logits, tiny_hf_ssm_model

import converters
import ssm_llm

VARIANTS = {
    "mamba": ("mamba", {}),
    "mamba-proj-bias": ("mamba", dict(use_bias=True, use_conv_bias=False, tie_word_embeddings=False)),
    "mamba2-groups2-chunk8": ("mamba2", {}),
    "mamba2-groups1-chunk7": ("mamba2", dict(n_groups=1, chunk_size=7, tie_word_embeddings=True)),
    "mamba2-dt-limit": ("mamba2", dict(time_step_limit=(0.0, 0.05))),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    kind, overrides = VARIANTS[request.param]
    model = tiny_hf_ssm_model(kind, **overrides)
    config, params = converters.load(model)
    return request.param, model, config, params


def prompt(length, vocab, seed=None):
    return np.random.default_rng(length if seed is None else seed).integers(0, vocab, length).tolist()


def test_config_reflects_variant(pair):
    name, model, config, _ = pair
    assert config.num_layers == 3 and config.state_size == 8 and config.max_position_embeddings is None
    assert isinstance(config, ssm_llm.Mamba2Config if name.startswith("mamba2") else ssm_llm.MambaConfig)
    if name.startswith("mamba2"):
        assert config.num_heads == 6 and config.head_dim == 16
        assert (config.n_groups, config.chunk_size) == ((1, 7) if "groups1" in name else (2, 8))
    if name == "mamba2-dt-limit":
        assert config.time_step_limit == (0.0, 0.05)
    assert config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize("length", [1, 5, 16, 23])
def test_logits_match_transformers(pair, length):
    _, model, config, params = pair
    ids = prompt(length, config.vocab_size)
    ref = hf_logits(model, ids)
    logits, cache = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 32))
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-4, rtol=0)
    assert int(cache.lengths[0]) == length


def test_greedy_generate_matches_transformers(pair):
    _, model, config, params = pair
    ids = prompt(9, config.vocab_size, seed=0)
    expected = hf_greedy(model, ids, 20)
    result = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=()))
    assert result.tokens[0] == expected
    assert result.finish_reasons == ["length"]


def test_cached_decode_equals_full_forward(pair):
    _, _, config, params = pair
    ids = prompt(19, config.vocab_size, seed=3)
    full, full_cache = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 32))
    # a prefix prefill, then a multi-token chunk through the cached prefill path, then single steps
    cache = ssm_llm.init_cache(config, 1, 32)
    pieces = []
    for start, stop in [(0, 6), (6, 15)] + [(t, t + 1) for t in range(15, 19)]:
        logits, cache = ssm_llm.forward(params, config, jnp.asarray([ids[start:stop]]), cache)
        pieces.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(pieces), np.asarray(full[0]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.ssm_state), np.asarray(full_cache.ssm_state), atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.conv_state), np.asarray(full_cache.conv_state), atol=1e-5)
    assert int(cache.lengths[0]) == 19


def test_ragged_batch_equals_each_sequence_alone(pair):
    _, _, config, params = pair
    prompts = [prompt(n, config.vocab_size, seed=n + 100) for n in (3, 14, 1, 9)]
    width = 16
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
        tokens[row, len(p) :] = 7  # padding that would corrupt the state if it were not masked
    counts = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = ssm_llm.forward(
        params, config, jnp.asarray(tokens), ssm_llm.init_cache(config, 4, 32), token_counts=counts
    )
    step_logits, step_cache = ssm_llm.forward(params, config, jnp.asarray([[2], [3], [4], [5]]), cache)
    for row, p in enumerate(prompts):
        alone, alone_cache = ssm_llm.forward(params, config, jnp.asarray([p]), ssm_llm.init_cache(config, 1, 32))
        np.testing.assert_allclose(np.asarray(logits[row, : len(p)]), np.asarray(alone[0]), atol=2e-5)
        np.testing.assert_allclose(
            np.asarray(cache.ssm_state[:, row]), np.asarray(alone_cache.ssm_state[:, 0]), atol=2e-5
        )
        np.testing.assert_allclose(
            np.asarray(cache.conv_state[:, row]), np.asarray(alone_cache.conv_state[:, 0]), atol=2e-5
        )
        alone_step, _ = ssm_llm.forward(params, config, jnp.asarray([[row + 2]]), alone_cache)
        np.testing.assert_allclose(np.asarray(step_logits[row]), np.asarray(alone_step[0]), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(step_cache.lengths), np.asarray(counts) + 1)
    gen = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=())
    batched = ssm_llm.generate(params, config, prompts, gen).tokens
    assert batched == [ssm_llm.generate(params, config, [p], gen).tokens[0] for p in prompts]


def test_unstacked_layer_layout_gives_the_same_logits_and_tokens(pair):
    _, _, config, params = pair
    unstacked = ssm_llm.unstack_layers(params)
    assert not ssm_llm.is_stacked(unstacked) and len(unstacked["layers"]) == config.num_layers
    ids = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6]])
    a, cache_a = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, 16))
    b, cache_b = ssm_llm.forward(unstacked, config, ids, ssm_llm.init_cache(config, 1, 16))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache_a.ssm_state), np.asarray(cache_b.ssm_state), atol=1e-5)
    gen = ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=())
    assert (
        ssm_llm.generate(unstacked, config, [[3, 4], [7]], gen).tokens
        == ssm_llm.generate(params, config, [[3, 4], [7]], gen).tokens
    )


def test_generation_is_not_limited_by_a_context_length(pair):
    _, _, config, params = pair
    result = ssm_llm.generate(
        params, config, [[1, 2, 3]], ssm_llm.GenerationConfig(max_new_tokens=40, eos_token_ids=(), max_len=43)
    )
    assert len(result.tokens[0]) == 40
    with pytest.raises(ValueError, match="exceeds max_len 42"):
        ssm_llm.generate(
            params, config, [[1, 2, 3]], ssm_llm.GenerationConfig(max_new_tokens=40, eos_token_ids=(), max_len=42)
        )


def test_random_init_runs_both_families():
    shared = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, state_size=4)
    for config in (
        ssm_llm.MambaConfig(**shared),
        ssm_llm.Mamba2Config(**shared, num_heads=4, head_dim=16, n_groups=2, chunk_size=4),
    ):
        params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
        logits, cache = ssm_llm.forward(
            params, config, jnp.asarray([[1, 2, 3, 4, 5]]), ssm_llm.init_cache(config, 1, 8)
        )
        assert logits.shape == (1, 5, 50) and np.isfinite(np.asarray(logits)).all()


def test_wrong_cache_type_is_a_clear_error(pair):
    _, _, config, params = pair
    attention = ssm_llm.ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )
    with pytest.raises(TypeError, match="SSMCache"):
        ssm_llm.forward(params, config, jnp.asarray([[1, 2]]), ssm_llm.init_cache(attention, 1, 8))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        ssm_llm.init_cache(config, 1, 0)
