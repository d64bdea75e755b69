"""Greedy speculative decoding under a constraint gives exactly the tokens (and finish reasons) of greedy
constrained decoding, for attention and state-space targets and every kind of drafter; drafts are pruned by
their paths in the grammar exactly as single-path checks would (the row's state unchanged); clear errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_over_smollm2_vocab

import ssm_llm
from ssm_llm import constraints
from ssm_llm.constrained_speculation import ForcedTokens
from ssm_llm.speculative import DraftModel, PromptLookup, TokenRecycling
from ssm_llm.speculative.tree import UNUSED

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # ragged
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}


@pytest.fixture(scope="module")
def bound(smollm2_tokenizers):
    return smollm2_tokenizers[1]


@pytest.fixture(scope="module", params=["llama", "mamba2"])
def model(request):
    config = tiny_over_smollm2_vocab(request.param)
    return config, ssm_llm.init_params(config, jax.random.PRNGKey(0))


def both(model, constraint, drafter, **kw):
    """(constrained greedy generate, the same with `drafter`)."""
    config, params = model
    gen = dict(max_new_tokens=24, constraint=constraint, eos_token_ids=(0,))
    gen.update(kw)
    plain = ssm_llm.generate(params, config, PROMPTS, ssm_llm.GenerationConfig(**gen))
    fast = ssm_llm.generate(params, config, PROMPTS, ssm_llm.GenerationConfig(**gen, speculative=drafter))
    return plain, fast


def assert_same(plain, fast):
    assert fast.tokens == plain.tokens
    assert fast.finish_reasons == plain.finish_reasons


@pytest.mark.parametrize("drafter", ["self", "lookup", "recycling", "forced"])
def test_same_tokens_as_constrained_greedy_decoding(model, bound, drafter):
    """A regex the random model never wants (every step falls back to the mask, most drafts pruned) and a JSON
    schema; the draft model is the target itself, so its drafts are the unconstrained argmax."""
    config, params = model
    make = {
        "self": lambda: DraftModel(params, config, 4),
        "lookup": PromptLookup,
        "recycling": TokenRecycling,
        "forced": ForcedTokens,
    }
    for constraint in (constraints.Regex("(cat|dog)-[0-9]{2}x+", bound), constraints.JSONSchema(SCHEMA, bound)):
        assert_same(*both(model, constraint, make[drafter]()))


def test_drafts_the_grammar_allows_are_accepted(model, bound):
    """A grammar allowing almost any text: the target's own drafts are accepted, several tokens per forward."""
    config, params = model
    plain, fast = both(model, constraints.Regex("[^\\n]{1,60}", bound), DraftModel(params, config, 4))
    assert_same(plain, fast)
    assert sum(fast.speculative.accepted) > sum(fast.speculative.rounds)  # over 2 tokens per forward


def test_forced_tokens_are_drafted_and_accepted(model, bound):
    """ForcedTokens drafts what the grammar forces (the JSON keys and punctuation), which the target always
    accepts: several tokens per forward from a model whose own choices are random."""
    schema = {
        "type": "object",
        "properties": {
            "temperature": {"type": "integer", "minimum": 0, "maximum": 99},
            "description": {"type": "boolean"},
        },
        "required": ["temperature", "description"],
        "additionalProperties": False,
    }
    plain, fast = both(model, constraints.JSONSchema(schema, bound), ForcedTokens(num_tokens=3))
    assert_same(plain, fast)
    assert all(a >= 3 for a in fast.speculative.accepted)  # "temperature", "description" and their quotes at least


def test_grammar_endings_and_one_token(model, bound):
    """Without EOS ids a complete grammar ends its row ("constraint"), also when it completes on the last token;
    one new token."""
    config, params = model
    grammar = constraints.Grammar('start: "yes" | "no" | "maybe so"', bound)
    for n in (1, 2, 24):
        plain, fast = both(model, grammar, DraftModel(params, config, 3), eos_token_ids=(), max_new_tokens=n)
        assert_same(plain, fast)
        assert n < 3 or "constraint" in fast.finish_reasons  # complete answers end by the grammar
    plain, fast = both(model, constraints.Regex("[a-z]{3}", bound), PromptLookup(), eos_token_ids=(), max_new_tokens=1)
    assert_same(plain, fast)


def _path(tokens, parents, node):
    path = []
    while node > 0:
        path.append(int(tokens[node]))
        node = parents[node]
    return path[::-1]


def _brute_force(constraint, prefix, tokens, parents, eos):
    """Each node's verdict from a fresh matcher: its whole path checked at once (an EOS id only at the end of a
    complete text)."""
    keep = parents != UNUSED
    for node in np.flatnonzero(keep)[1:]:
        path = _path(tokens, parents, node)
        matcher = constraint.matcher()
        matcher.consume_tokens(prefix + path[:-1]) if not set(path[:-1]) & set(eos) else None
        if set(path[:-1]) & set(eos) or matcher.is_error():
            keep[node] = False
        elif path[-1] in eos:
            keep[node] = matcher.is_accepting()
        else:
            keep[node] = matcher.validate_tokens([path[-1]]) == 1
    return keep


def _random_tree(rng, size, pool):
    """A tree of `size` nodes over the tokens `pool`, some nodes unused."""
    parents = np.full(size, UNUSED, np.int64)
    parents[0] = -1
    for node in range(1, size):
        if rng.random() > 0.15:
            parents[node] = rng.choice(np.flatnonzero(parents[:node] != UNUSED))
    return rng.choice(pool, size), parents


def test_tree_pruning_equals_path_checks(bound):
    """`Matchers.tree_allows` on random trees (tokens the grammar allows somewhere along a JSON text, random ones,
    the EOS id) equals a fresh matcher's check of every node's whole path, and leaves the row's state as it was."""
    constraint, eos = constraints.JSONSchema(SCHEMA, bound), (0,)
    text = bound.tokenize_str('{"name":"abc","n":12}')
    rng = np.random.default_rng(0)
    pool = np.concatenate([text, text, rng.integers(1, 49152, 8), [0, 0]])
    for trial in range(16):
        prefix = text[: trial % (len(text) + 1)]
        matchers = constraints.Matchers(constraint, 1, 49152, eos)
        for token in prefix:
            matchers.consume(0, token)
        before = matchers.row_mask(0)
        tokens, parents = _random_tree(rng, 16, pool)
        tokens[1], parents[1] = ([*text, 0])[len(prefix)], 0  # the text's own next token: always kept
        got = matchers.tree_allows(0, tokens, parents)
        assert (got == _brute_force(constraint, prefix, tokens, parents, eos)).all(), trial
        assert got[1], trial
        matchers._next[0] = None  # recompute: the state must be the one before
        assert (matchers.row_mask(0) == before).all()


def test_errors(bound):
    with pytest.raises(ValueError, match="greedy only"):
        ssm_llm.GenerationConfig(constraint=constraints.Regex("a+", bound), speculative=PromptLookup(), temperature=0.7)
    with pytest.raises(ValueError, match="drafts the tokens a constraint forces"):
        ssm_llm.GenerationConfig(speculative=ForcedTokens())
    with pytest.raises(ValueError, match="num_tokens"):
        ForcedTokens(num_tokens=0)
    with pytest.raises(ValueError, match="num_beams"):
        ssm_llm.GenerationConfig(constraint=constraints.Regex("a+", bound), num_beams=2)
