"""Logits and greedy-token parity with Hugging Face transformers for tiny random attention models."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_greedy, hf_logits, tiny_hf_model

import converters
import ssm_llm

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ),
    "linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mistral-sliding": ("mistral", dict(sliding_window=6)),
    "head-dim-16": ("llama", dict(head_dim=16)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    kind, overrides = VARIANTS[request.param]
    model = tiny_hf_model(kind, **overrides)
    config, params = converters.load(model)
    return request.param, model, config, params


def test_config_reflects_variant(pair):
    name, model, config, _ = pair
    assert config.num_kv_heads == 2 and config.num_heads == 6
    if name == "qwen2-sliding":
        assert config.layer_windows == (0, 5, 5)
    if name == "mistral-sliding":
        assert config.layer_windows == (6, 6, 6)
    if name == "llama3-rope":
        assert config.rope.rope_type == "llama3" and config.rope.theta == 500000.0
    if name == "head-dim-16":
        assert config.head_dim == 16 and config.q_size == 96


@pytest.mark.parametrize("length", [1, 7, 23])
def test_logits_match_transformers(pair, length):
    _, model, config, params = pair
    ids = np.random.default_rng(length).integers(0, config.vocab_size, length).tolist()
    ref = hf_logits(model, ids)
    cache = ssm_llm.init_cache(config, 1, 32)
    logits, cache = ssm_llm.forward(params, config, jnp.asarray([ids]), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-4, rtol=0)
    assert int(cache.lengths[0]) == length


def test_greedy_generate_matches_transformers(pair):
    _, model, config, params = pair
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 9).tolist()
    expected = hf_greedy(model, ids, 20)
    result = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=()))
    assert result.tokens[0] == expected
    assert result.finish_reasons == ["length"]


def test_unstacked_layer_layout_gives_the_same_logits_and_tokens(pair):
    _, _, config, params = pair
    unstacked = ssm_llm.unstack_layers(params)
    assert not ssm_llm.is_stacked(unstacked) and len(unstacked["layers"]) == config.num_layers
    ids = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6]])
    for fresh_cache in (True, False):
        cache = ssm_llm.init_cache(config, 1, 16)
        if not fresh_cache:  # a non-empty cache takes the cache-attention path
            _, cache = ssm_llm.forward(params, config, ids[:, :3], cache)
        a, cache_a = ssm_llm.forward(params, config, ids[:, 3:], cache)
        b, cache_b = ssm_llm.forward(unstacked, config, ids[:, 3:], cache)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        np.testing.assert_allclose(np.asarray(cache_a.k), np.asarray(cache_b.k), atol=1e-5)
    gen = ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=())
    assert (
        ssm_llm.generate(unstacked, config, [[3, 4], [7]], gen).tokens
        == ssm_llm.generate(params, config, [[3, 4], [7]], gen).tokens
    )
    restacked = ssm_llm.stack_layers(unstacked)
    for name, value in params["layers"].items():
        np.testing.assert_array_equal(np.asarray(restacked["layers"][name]), np.asarray(value))


@pytest.mark.parametrize("shape", [(576,), (0, 576), (1, 1, 576), (4, 576), (2, 3, 4, 576), (32, 576), (33, 576)])
def test_tied_logits_small_row_path_matches_matmul(shape):
    """`logits_from_hidden` computes tied logits for <= SMALL_ROWS rows as `embed @ h.T` (faster on
    CPU): the same values and shape as `h @ embed.T` on every side of the threshold."""
    from types import SimpleNamespace

    from ssm_llm.models.lm_head import SMALL_ROWS, logits_from_hidden

    assert SMALL_ROWS == 32
    rng = np.random.default_rng(0)
    embed = jnp.asarray(rng.standard_normal((1000, 576)), jnp.float32)
    h = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    logits = logits_from_hidden({"embed": embed}, SimpleNamespace(tie_word_embeddings=True), h)
    assert logits.shape == shape[:-1] + (1000,) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(h) @ np.asarray(embed).T, rtol=1e-4, atol=1e-4)
