"""Cached decode equals the uncached forward; ragged batches equal each sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm

CONFIG = ssm_llm.ModelConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    layer_windows=(0, 7),
)


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))


def full_logits(params, ids):
    cache = ssm_llm.init_cache(CONFIG, 1, 64)
    return np.asarray(ssm_llm.forward(params, CONFIG, jnp.asarray([ids]), cache)[0][0])


def test_ragged_prefill_then_token_by_token_decode_equals_full_forward(params):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (20, 13, 17)]
    prompt_lens = [5, 1, 9]
    width = max(prompt_lens)
    tokens = np.zeros((3, width), np.int32)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        tokens[b, :n] = s[:n]
    cache = ssm_llm.init_cache(CONFIG, 3, 40)
    logits, cache = ssm_llm.forward(params, CONFIG, jnp.asarray(tokens), cache, token_counts=jnp.asarray(prompt_lens))
    assert cache.lengths.tolist() == prompt_lens
    refs = [full_logits(params, s) for s in seqs]
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), refs[b][:n], atol=1e-5)
    # Decode one token per step; each sequence continues at its own position.
    for step in range(max(len(s) for s in seqs) - min(prompt_lens)):
        pos = [n + step for n in prompt_lens]
        nxt = [s[p] if p < len(s) else 0 for s, p in zip(seqs, pos, strict=True)]
        logits, cache = ssm_llm.forward(params, CONFIG, jnp.asarray(nxt)[:, None], cache)
        for b, p in enumerate(pos):
            if p < len(seqs[b]):
                np.testing.assert_allclose(np.asarray(logits[b, 0]), refs[b][p], atol=1e-5)


def test_batching_does_not_change_greedy_output(params):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (3, 11, 1, 6)]
    gen = ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=())
    batched = ssm_llm.generate(params, CONFIG, prompts, gen).tokens
    alone = [ssm_llm.generate(params, CONFIG, [p], gen).tokens[0] for p in prompts]
    assert batched == alone


def test_forward_does_not_mutate_its_cache(params):
    cache = ssm_llm.init_cache(CONFIG, 1, 16)
    before = np.asarray(cache.k).copy()
    ssm_llm.forward(params, CONFIG, jnp.asarray([[1, 2, 3]]), cache)
    np.testing.assert_array_equal(np.asarray(cache.k), before)
    assert int(cache.lengths[0]) == 0


def test_cache_overflow_is_an_error(params):
    cache = ssm_llm.init_cache(CONFIG, 2, 8)
    _, cache = ssm_llm.forward(params, CONFIG, jnp.ones((2, 6), jnp.int32), cache)
    with pytest.raises(ValueError, match="cache overflow: sequence 0 would hold 9"):
        ssm_llm.forward(params, CONFIG, jnp.ones((2, 3), jnp.int32), cache)
    with pytest.raises(ValueError, match="do not fit a cache of max_len 8"):
        ssm_llm.forward(params, CONFIG, jnp.ones((2, 9), jnp.int32), ssm_llm.init_cache(CONFIG, 2, 8))


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([[1, 2, 97]], "token id 97 is outside the vocabulary"),
        ([[-1]], "token id -1 is outside"),
        ([1, 2, 3], r"tokens must be \[batch, steps\]"),
        (np.zeros((1, 0), np.int32), "no steps"),
        ([[0.5, 1.0]], "array of int token ids, got dtype float"),
        ([[1], [2]], "tokens batch 2 != cache batch 1"),
    ],
)
def test_forward_rejects_bad_tokens(params, tokens, message):
    with pytest.raises(ValueError, match=message):
        ssm_llm.forward(params, CONFIG, jnp.asarray(tokens), ssm_llm.init_cache(CONFIG, 1, 8))


def test_init_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        ssm_llm.init_cache(CONFIG, 1, 0)
    with pytest.raises(ValueError, match="batch must be a positive int, got -2"):
        ssm_llm.init_cache(CONFIG, -2, 8)


def test_forward_under_user_jit(params):
    cache = ssm_llm.init_cache(CONFIG, 1, 16)
    step = jax.jit(lambda p, t, c: ssm_llm.forward(p, CONFIG, t, c))
    logits, cache = step(params, jnp.asarray([[4, 5]]), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits(params, [4, 5]), atol=1e-5)
