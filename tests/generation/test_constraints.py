"""Structured output: constrained outputs always match their regex / validate against their JSON schema /
parse in their grammar (hypothesis over patterns and schemas, a random model so nothing is learned), the
sampling law is the masked softmax (chi-square), and clear errors."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from conftest import tiny_over_smollm2_vocab
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssm_llm
from ssm_llm import constraints


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizers):
    """SmolLM2's real tokenizer and llguidance's view of it."""
    return smollm2_tokenizers


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama over SmolLM2's vocabulary: its choices are arbitrary, only the masks keep outputs valid."""
    config = tiny_over_smollm2_vocab("llama")
    return config, ssm_llm.init_params(config, jax.random.PRNGKey(0))


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # ragged
EOS = (0,)


def run(model, constraint, n=48, prompts=PROMPTS, **kw):
    config, params = model
    gen = ssm_llm.GenerationConfig(max_new_tokens=n, constraint=constraint, **{"eos_token_ids": EOS, **kw})
    return ssm_llm.generate(params, config, prompts, gen)


def text(tokenizer, ids):
    return tokenizer[0].decode(ids)


PIECES = ["[a-z]{1,3}", "[0-9]{2}", "(cat|dog|bird)", "-", "[A-Z]?", "x+y?", r"\.", "(ab){1,2}", "[a-c0-2]{3}"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4), temperature=st.sampled_from([0.0, 1.0]))
def test_outputs_match_the_regex(model, tokenizer, parts, temperature):
    pattern = "".join(parts)
    out = run(model, constraints.Regex(pattern, tokenizer[1]), temperature=temperature)
    rejection = run(
        model, constraints.Regex(pattern, tokenizer[1]), temperature=temperature, constrained_sampling="awrs"
    )
    assert rejection.tokens == out.tokens and rejection.finish_reasons == out.finish_reasons  # same noise, same law
    for ids, why in zip(out.tokens, out.finish_reasons, strict=True):
        if why == "length":  # x+ may run on: what was written is still a prefix the grammar accepts
            assert constraints.Regex(pattern, tokenizer[1]).matcher().validate_tokens(ids) == len(ids)
        else:
            assert why == "eos" and re.fullmatch(pattern, text(tokenizer, ids)), (pattern, text(tokenizer, ids))


def _property():
    return st.one_of(
        st.just({"type": "boolean"}),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 500),
        ),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(
            lambda words: {"enum": words},
            st.lists(st.sampled_from(["red", "green", "blue", "42", "null"]), min_size=1, max_size=3, unique=True),
        ),
        st.just({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}),
    )


SCHEMAS = st.dictionaries(
    st.sampled_from(["a", "name", "count", "ok", "tags"]), _property(), min_size=1, max_size=4
).map(lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 1.0]))
def test_outputs_validate_against_the_json_schema(model, tokenizer, schema, temperature):
    out = run(model, constraints.JSONSchema(schema, tokenizer[1]), n=96, temperature=temperature)
    rejection = run(
        model, constraints.JSONSchema(schema, tokenizer[1]), n=96, temperature=temperature, constrained_sampling="awrs"
    )
    assert rejection.tokens == out.tokens and rejection.finish_reasons == out.finish_reasons
    for ids, why in zip(out.tokens, out.finish_reasons, strict=True):
        value = text(tokenizer, ids)
        assert why == "eos", (schema, value)  # bounded schemas: every output completes
        jsonschema.validate(json.loads(value), schema)


def test_a_grammar_is_followed_and_without_eos_ids_the_grammar_ends_the_row(model, tokenizer):
    lark = 'start: item ("," item)*\nitem: "yes" | "no" | "(" item ")"'
    out = run(model, constraints.Grammar(lark, tokenizer[1]), n=24)
    word = re.compile(r"\(*(yes|no)\)*")
    for ids, why in zip(out.tokens, out.finish_reasons, strict=True):
        value = text(tokenizer, ids)
        items = value.split(",")
        assert all(word.fullmatch(i) and i.count("(") == i.count(")") for i in items[:-1]), value
        if why == "eos":
            assert word.fullmatch(items[-1]) and items[-1].count("(") == items[-1].count(")")
    finite = constraints.Grammar('start: "yes" | "no" | "maybe"', tokenizer[1])
    out = run(model, finite, n=8, eos_token_ids=())
    assert out.finish_reasons == ["constraint"] * 3
    rejection = run(model, finite, n=8, eos_token_ids=(), constrained_sampling="awrs")
    assert (rejection.tokens, rejection.finish_reasons) == (out.tokens, out.finish_reasons)
    assert all(text(tokenizer, ids) in ("yes", "no", "maybe") for ids in out.tokens)
    # One token, no room left for the EOS: a complete "yes" / "no" ends by the grammar, a partial one by length.
    out = run(model, constraints.Grammar('start: "yes" | "no"', tokenizer[1]), n=1)
    complete = [text(tokenizer, ids) in ("yes", "no") for ids in out.tokens]
    assert out.finish_reasons == ["constraint" if c else "length" for c in complete] and any(complete)
    rejection = run(model, constraints.Grammar('start: "yes" | "no"', tokenizer[1]), n=1, constrained_sampling="awrs")
    assert (rejection.tokens, rejection.finish_reasons) == (out.tokens, out.finish_reasons)
    empty = constraints.Regex("", tokenizer[1])  # only the empty text: nothing to write
    assert run(model, empty, n=4, eos_token_ids=()).finish_reasons == ["constraint"] * 3
    assert run(model, empty, n=4, eos_token_ids=(), constrained_sampling="awrs").finish_reasons == ["constraint"] * 3
    out = run(model, empty, n=4)
    assert out.tokens == [[]] * 3 and out.finish_reasons == ["eos"] * 3


@pytest.mark.parametrize("how", ["mask", "awrs"])
def test_the_sampled_law_is_the_masked_softmax(model, tokenizer, how):
    """First tokens of 1000 rows against the model's softmax renormalised over the allowed tokens, by masking
    and by rejection sampling."""
    from scipy.stats import chisquare

    config, params = model
    constraint = constraints.Regex("(cat|dog|bird|cow)s?", tokenizer[1])
    prompt = [3, 1, 4, 1, 5]
    out = run(model, constraint, n=1, prompts=[prompt] * 1000, temperature=1.0, seed=7, constrained_sampling=how)
    first = np.asarray([ids[0] for ids in out.tokens])
    allowed = constraints.Matchers(constraint, 1, config.vocab_size, EOS).masks(np.zeros(1, bool))[0]
    assert np.isin(first, np.flatnonzero(allowed)).all()
    logits, _ = ssm_llm.forward(params, config, jnp.asarray([prompt]), ssm_llm.init_cache(config, 1, 8))
    logits = np.asarray(logits[0, -1], np.float64)
    p = np.exp(logits[allowed] - logits[allowed].max())
    p /= p.sum()
    counts = np.bincount(np.searchsorted(np.flatnonzero(allowed), first), minlength=allowed.sum())
    keep = p * 1000 >= 5  # chi-square needs expected counts >= 5: pool the rare tokens
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(p[keep], p[~keep].sum()) * 1000
    assert chisquare(observed[expected > 0], expected[expected > 0]).pvalue > 1e-3


def test_rejection_takes_the_first_allowed_candidate_else_the_best_allowed_token(model, tokenizer):
    """`awrs.choose` against the masked argmax of the same scores, with allowed tokens among the candidates
    (one evaluation per candidate tried) and with none (the mask's fallback), and finished rows left out."""
    config, _ = model
    constraint = constraints.Regex("(cat|dog)[a-z0-9 ]*", tokenizer[1])
    matchers = constraints.Matchers(constraint, 3, config.vocab_size, EOS)
    cat = tokenizer[0]("cat").input_ids
    matchers.advance(np.asarray([cat[0], cat[0], -1]))  # rows 0, 1 inside the free part; row 2 at the start
    scores = jax.random.normal(jax.random.PRNGKey(3), (3, config.vocab_size))
    best = np.asarray(constraints.awrs.candidates(scores))
    done = np.asarray([False, True, False])
    before = matchers.evaluations
    chosen, ended = constraints.awrs.choose(matchers, scores, best, done)
    assert not ended.any()
    masks = constraints.Matchers(constraint, 3, config.vocab_size, EOS)
    masks.advance(np.asarray([cat[0], cat[0], -1]))
    expected = np.argmax(np.where(masks.masks(np.zeros(3, bool)), np.asarray(scores), -np.inf), axis=1)
    assert chosen[1] == -1 and chosen[[0, 2]].tolist() == expected[[0, 2]].tolist()
    assert chosen[0] in best[0]  # a free text: an allowed token among the first 16
    assert chosen[2] not in best[2]  # "cat" or "dog" first: none among them, the mask decided
    rank = best[0].tolist().index(chosen[0]) + 1
    assert matchers.evaluations - before == rank + len(best[2]) + tokenizer[1].vocab_size


def test_a_single_token_check_agrees_with_the_mask(model, tokenizer):
    """`Matchers.allows` = `row_mask` along a JSON schema's text, in forced states (llguidance's masks keep only the
    canonical first token of forced bytes: '{"' and not '{') and free ones, on every allowed token, the single
    characters and 500 others."""
    config, _ = model
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}}}
    schema |= {"required": ["name", "n"], "additionalProperties": False}
    matchers = constraints.Matchers(constraints.JSONSchema(schema, tokenizer[1]), 1, config.vocab_size, EOS)
    rng = np.random.default_rng(0)
    forced = free = 0
    for _ in range(40):
        mask = matchers.row_mask(0)
        tried = np.union1d(np.flatnonzero(mask)[:2000], rng.integers(0, config.vocab_size, 500))
        tried = np.union1d(tried, np.arange(256))  # the single characters: "{", "\"", digits
        assert [matchers.allows(0, int(t)) for t in tried] == mask[tried].tolist()
        forced, free = forced + (mask.sum() == 1), free + (mask.sum() > 1)
        if mask[EOS[0]]:
            break
        matchers.advance(np.asarray([rng.choice(np.flatnonzero(mask))]))
    assert forced and free


def test_streaming_and_kv_compression_keep_the_constraint(model, tokenizer):
    constraint = constraints.Regex("[a-z]{2,5}-[0-9]{3}", tokenizer[1])
    plain = run(model, constraint, n=16)
    seen = []
    streamed = ssm_llm.generate(
        model[1],
        model[0],
        PROMPTS,
        ssm_llm.GenerationConfig(max_new_tokens=16, constraint=constraint, eos_token_ids=EOS),
        on_token=lambda step, tokens: seen.append(tokens),
    )
    assert streamed.tokens == plain.tokens and len(seen) >= max(len(t) for t in plain.tokens)
    seen_by_rejection = []
    rejection = ssm_llm.generate(
        model[1],
        model[0],
        PROMPTS,
        ssm_llm.GenerationConfig(
            max_new_tokens=16, constraint=constraint, eos_token_ids=EOS, constrained_sampling="awrs"
        ),
        on_token=lambda step, tokens: seen_by_rejection.append(tokens),
    )
    assert rejection.tokens == plain.tokens
    assert np.array_equal(np.stack(seen_by_rejection), np.stack(seen))
    compressed = run(model, constraint, n=16, kv_compression=ssm_llm.kv.StreamingLLM(budget=8, sinks=2))
    for ids in compressed.tokens:
        assert re.fullmatch("[a-z]{2,5}-[0-9]{3}", text(tokenizer, ids))


def test_bad_constraints_are_refused_by_name(tokenizer):
    llt = tokenizer[1]
    with pytest.raises(ValueError, match="(?s)regex '\\(' is not a valid constraint.*unclosed group"):
        constraints.Regex("(", llt)
    with pytest.raises(ValueError, match="JSON schema .* is not a valid constraint"):
        constraints.JSONSchema({"type": "bogus"}, llt)
    with pytest.raises(ValueError, match="the schema text is not JSON"):
        constraints.JSONSchema("{not json", llt)
    with pytest.raises(ValueError, match="grammar .* is not a valid constraint"):
        constraints.Grammar("start: missing_rule", llt)
    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        constraints.Regex("a", object())
    with pytest.raises(ValueError, match="constraint must be None or one of"):
        ssm_llm.GenerationConfig(constraint="[a-z]+")
    regex = constraints.Regex("a+", llt)
    small = ssm_llm.ModelConfig(
        vocab_size=1000, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
    )
    with pytest.raises(ValueError, match="tokenizer of 49152 tokens, more than the model's vocabulary of 1000"):
        ssm_llm.generate(
            ssm_llm.init_params(small, jax.random.PRNGKey(0)),
            small,
            [[1, 2]],
            ssm_llm.GenerationConfig(constraint=regex),
        )
    with pytest.raises(ValueError, match="speculative decoding is greedy only"):
        ssm_llm.GenerationConfig(constraint=regex, speculative=ssm_llm.speculative.PromptLookup(), temperature=1.0)
    with pytest.raises(ValueError, match="'mask' or 'awrs'"):
        ssm_llm.GenerationConfig(constraint=regex, constrained_sampling="reject")
    with pytest.raises(ValueError, match="awrs' samples under a constraint: set constraint"):
        ssm_llm.GenerationConfig(constrained_sampling="awrs")
    with pytest.raises(ValueError, match="top_p, min_p would be computed among the allowed tokens"):
        ssm_llm.GenerationConfig(constraint=regex, constrained_sampling="awrs", temperature=1, top_p=0.9, min_p=0.1)
    ssm_llm.GenerationConfig(constraint=regex, constrained_sampling="awrs", top_p=0.9)  # greedy: no filter applies
    with pytest.raises(ValueError, match="does not combine with num_beams"):
        ssm_llm.GenerationConfig(constraint=regex, num_beams=2)
