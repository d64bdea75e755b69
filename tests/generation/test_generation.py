"""generate(): EOS handling, per-sequence stopping, streaming, and clear errors on bad input."""

import jax
import numpy as np
import pytest

import ssm_llm

CONFIG = ssm_llm.ModelConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(CONFIG, jax.random.PRNGKey(2))


def greedy(params, prompts, n=10, **kw):
    return ssm_llm.generate(params, CONFIG, prompts, ssm_llm.GenerationConfig(max_new_tokens=n, **kw))


def test_sequences_stop_independently_at_eos(params):
    prompts = [[1, 2, 3], [7, 8], [9]]
    free = greedy(params, prompts, eos_token_ids=()).tokens
    # Make the 4th token of sequence 0 an EOS; the others must be unaffected.
    eos = free[0][3]
    out = greedy(params, prompts, eos_token_ids=(eos,))
    assert out.tokens[0] == free[0][:3] and out.finish_reasons[0] == "eos"
    for b in (1, 2):
        expected = free[b][: free[b].index(eos)] if eos in free[b] else free[b]
        assert out.tokens[b] == expected
        assert out.finish_reasons[b] == ("eos" if eos in free[b] else "length")


def test_eos_on_first_token_gives_empty_output(params):
    first = greedy(params, [[4, 5]], n=1, eos_token_ids=()).tokens[0][0]
    out = greedy(params, [[4, 5]], n=5, eos_token_ids=(first,))
    assert out.tokens == [[]] and out.finish_reasons == ["eos"]


def test_max_new_tokens_is_respected(params):
    out = greedy(params, [[1], [2, 3, 4]], n=7, eos_token_ids=())
    assert [len(t) for t in out.tokens] == [7, 7]
    assert out.finish_reasons == ["length", "length"]


@pytest.mark.parametrize("drafter", [None, ssm_llm.speculative.PromptLookup(3)], ids=["plain", "speculative"])
def test_max_new_tokens_of_one_bucket_share_one_compiled_loop(params, drafter):
    """The decode loops take max_new_tokens as a traced count (the output width is bucketed): 3, 9 and 20
    tokens compile one loop, and each shorter greedy output is the longer one's prefix."""
    from ssm_llm.generation import _decode
    from ssm_llm.speculative.decode import speculative_decode

    loop = _decode if drafter is None else speculative_decode
    prompts = [[1, 2, 3, 1, 2], [7, 8]]
    longest = greedy(params, prompts, n=20, eos_token_ids=(), speculative=drafter).tokens
    before = loop._cache_size()
    for n in (3, 9):
        out = greedy(params, prompts, n=n, eos_token_ids=(), speculative=drafter)
        assert out.tokens == [row[:n] for row in longest] and out.finish_reasons == ["length", "length"]
    assert loop._cache_size() == before


def test_streaming_callback_sees_every_token(params):
    seen = []
    out = ssm_llm.generate(
        params,
        CONFIG,
        [[1, 2], [3]],
        ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=()),
        on_token=lambda step, toks: seen.append((int(step), np.asarray(toks).tolist())),
    )
    jax.effects_barrier()
    assert [s for s, _ in seen] == list(range(6))
    assert [[t[b] for _, t in seen] for b in range(2)] == out.tokens


def test_streaming_draws_the_same_tokens_as_the_compiled_loop(params):
    """With `on_token`, decoding runs one compiled step at a time: the same keys, so the same samples, and
    the same early end for every row."""
    gen = ssm_llm.GenerationConfig(max_new_tokens=9, temperature=1.3, top_k=20, seed=7, eos_token_ids=(5,))
    prompts = [[1, 2], [3], [4, 5, 6]]
    plain = ssm_llm.generate(params, CONFIG, prompts, gen)
    streamed = ssm_llm.generate(params, CONFIG, prompts, gen, on_token=lambda step, tokens: None)
    assert streamed.tokens == plain.tokens and streamed.finish_reasons == plain.finish_reasons


def test_default_eos_comes_from_the_model_config(params):
    free = greedy(params, [[1, 2, 3]], eos_token_ids=()).tokens[0]
    config = ssm_llm.ModelConfig(**{**CONFIG.__dict__, "eos_token_ids": (free[2],)})
    out = ssm_llm.generate(params, config, [[1, 2, 3]], ssm_llm.GenerationConfig(max_new_tokens=10))
    assert out.tokens[0] == free[:2]


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "non-empty list"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1, 50]], "token id 50, outside the vocabulary"),
        ([[-3]], "token id -3"),
        ([1, 2, 3], r"wrap a single prompt as \[ids\]"),
        ("hello", "non-empty list of token-id lists"),
        ([[1.5, 2.0]], "flat list of int token ids"),
    ],
)
def test_bad_prompts(params, prompts, message):
    with pytest.raises(ValueError, match=message):
        greedy(params, prompts)


def test_prompt_longer_than_max_len(params):
    with pytest.raises(
        ValueError, match=r"longest prompt \(20 tokens\) \+ max_new_tokens \(4\) = 24 exceeds max_len 16"
    ):
        greedy(params, [[1] * 20], n=4, max_len=16)


def test_max_new_tokens_past_the_cache(params):
    with pytest.raises(ValueError, match="= 21 exceeds max_len 20"):
        greedy(params, [[1] * 5], n=16, max_len=20)


def test_past_the_model_context(params):
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions"):
        greedy(params, [[1] * 60], n=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), r"max_new_tokens must be an int in \[1, 1048576\], got 0"),
        (dict(temperature=-1.0), r"temperature must be a finite number in \[0.0, inf\), got -1.0"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0.0, 1.0\]"),
        (dict(top_p=1.5), r"top_p must be a finite number in \(0.0, 1.0\]"),
        (dict(min_p=1.0), r"min_p must be a finite number in \[0.0, 1.0\)"),
        (dict(top_k=-2), r"top_k must be an int >= 0, got -2"),
        (dict(max_len=0), r"max_len must be a positive int, got 0"),
    ],
)
def test_bad_generation_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ssm_llm.GenerationConfig(**kwargs)


def test_explicit_max_len_and_sampling_runs(params):
    out = ssm_llm.generate(
        params,
        CONFIG,
        [[1, 2, 3]],
        ssm_llm.GenerationConfig(
            max_new_tokens=5, temperature=0.8, top_p=0.9, min_p=0.05, top_k=10, max_len=8, eos_token_ids=()
        ),
    )
    assert len(out.tokens[0]) == 5 and all(0 <= t < CONFIG.vocab_size for t in out.tokens[0])
