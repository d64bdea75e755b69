"""PromptLookup: the longest, then latest, repeated suffix; drafts cut at the history end; ragged rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_llm.sampling import Sampling
from ssm_llm.speculative.prompt_lookup import PromptLookup
from ssm_llm.speculative.protocol import DraftContext
from ssm_llm.speculative.tree import check_tree

SAMPLING = Sampling(temperature=jnp.float32(1.0))
KEY = jax.random.PRNGKey(0)
GARBAGE = 63


def context(rows, width=None, fill=GARBAGE):
    """rows: token lists (ragged); the history is padded with `fill` (or per-row lists in `fill`)."""
    width = width or max(len(r) for r in rows)
    history = np.full((len(rows), width), GARBAGE, np.int32)
    for b, row in enumerate(rows):
        pad = fill[b] if isinstance(fill, list) else []
        tail = (list(row) + list(pad))[:width]
        history[b, : len(tail)] = tail
    return DraftContext(jnp.asarray(history), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.ones(len(rows), bool))


def drafts(drafter, ctx):
    """Per row: (root, the proposed chain as a list), after checking the tree."""
    tree, state = drafter.propose((), ctx, SAMPLING, KEY)
    check_tree(tree, vocab_size=64)
    assert tree.size == drafter.tree_size and tree.child_probs is None and tree.draw == "deterministic"
    assert state == ()
    used = np.asarray(tree.used)
    tokens = np.asarray(tree.tokens)
    out = []
    for b in range(tree.batch):
        k = int(used[b].sum()) - 1
        assert used[b, : k + 1].all() and not used[b, k + 1 :].any(), "a chain uses a prefix of its nodes"
        out.append((int(tokens[b, 0]), tokens[b, 1 : k + 1].tolist()))
    return out


# 3-gram (1 2 3) at 0..2; 2-gram (2 3) latest at 5..6; 1-gram (3) latest at 9; the suffix is 1 2 3.
HISTORY = [1, 2, 3, 10, 11, 2, 3, 20, 21, 3, 30, 1, 2, 3]


@pytest.mark.parametrize(
    "max_ngram, expected",
    [
        (3, [10, 11, 2, 3, 20, 21, 3, 30]),  # the 3-gram wins, 8 tokens
        (2, [20, 21, 3, 30, 1, 2, 3]),  # cut at the end of the history: 7 tokens
        (1, [30, 1, 2, 3]),
    ],
)
def test_longest_ngram_wins(max_ngram, expected):
    [(root, chain)] = drafts(PromptLookup(num_tokens=8, max_ngram=max_ngram), context([HISTORY]))
    assert root == 3 and chain == expected


def test_latest_occurrence_wins():
    [(_, chain)] = drafts(PromptLookup(num_tokens=2, max_ngram=2), context([[4, 5, 6, 4, 5, 7, 4, 5]]))
    assert chain == [7, 4]


def test_no_match_proposes_only_the_root():
    rows = [[1, 2, 3, 4], [9], [5, 6, 7, 5]]
    out = drafts(PromptLookup(num_tokens=4, min_ngram=2, max_ngram=3), context(rows))
    assert out == [(4, []), (9, []), (5, [])]  # row 2's 1-gram match is below min_ngram
    assert drafts(PromptLookup(num_tokens=4), context(rows))[2] == (5, [6, 7, 5])


def test_occurrence_may_overlap_the_suffix():
    [(root, chain)] = drafts(PromptLookup(num_tokens=4, max_ngram=3), context([[7, 7, 7]]))
    assert root == 7 and chain == [7]  # "7 7" ends at 1, then only history[2] follows


def test_ragged_rows_ignore_the_history_past_their_length():
    rows = [[1, 2, 1, 3, 1], [4, 4, 8, 9, 4, 8]]
    # Garbage that would be a later (and longer) match if it counted: 3 1 2 after row 0's suffix.
    fill = [[3, 1, 2, 3, 1, 40], [9, 4, 8, 41, 42]]
    out = drafts(PromptLookup(num_tokens=3, max_ngram=3), context(rows, width=12, fill=fill))
    assert out == [(1, [3, 1]), (8, [9, 4, 8])]


def reference(row, num_tokens, max_ngram, min_ngram):
    """Plain Python prompt lookup over one row."""
    length = len(row)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length < n + 1:
            continue
        suffix = row[length - n :]
        starts = [p for p in range(length - n) if row[p : p + n] == suffix]
        if starts:
            p = max(starts)
            return row[p + n : p + n + num_tokens]
    return []


def test_matches_a_plain_python_reference_on_random_histories():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 3, rng.integers(1, 30)).tolist() for _ in range(24)]
    ctx = context(rows, width=32, fill=[rng.integers(0, 3, 32).tolist() for _ in rows])
    for num_tokens, max_ngram, min_ngram in [(5, 3, 1), (4, 4, 2), (3, 2, 2)]:
        drafter = PromptLookup(num_tokens, max_ngram, min_ngram)
        got = drafts(drafter, ctx)
        for row, (root, chain) in zip(rows, got, strict=True):
            assert root == row[-1] and chain == reference(row, num_tokens, max_ngram, min_ngram), row


def test_jit_matches_eager_and_update_keeps_the_state():
    drafter = PromptLookup(num_tokens=5, max_ngram=3)
    ctx = context([HISTORY, [4, 5, 6, 4, 5]], width=16)
    eager, _ = drafter.propose((), ctx, SAMPLING, KEY)
    jitted, _ = jax.jit(lambda d, c: d.propose((), c, SAMPLING, KEY))(drafter, ctx)
    np.testing.assert_array_equal(jitted.tokens, eager.tokens)
    np.testing.assert_array_equal(jitted.parents, eager.parents)
    assert drafter.init({}, None, ctx.history, ctx.lengths, 16, "xla") == ()
    assert drafter.update((), ctx, eager, None, None) == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, r"num_tokens must be an int >= 1, got 0"),
        ({"num_tokens": 2.0}, r"num_tokens must be an int >= 1, got 2.0"),
        ({"min_ngram": 0}, r"min_ngram must be an int >= 1, got 0"),
        ({"max_ngram": True}, r"max_ngram must be an int >= 1, got True"),
        ({"max_ngram": 2, "min_ngram": 3}, r"max_ngram \(2\) must be >= min_ngram \(3\)"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptLookup(**kwargs)


@pytest.mark.slow
def test_greedy_generate_with_prompt_lookup_matches_plain_greedy():
    import ssm_llm

    config = ssm_llm.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=128,
    )
    params = ssm_llm.init_params(config, jax.random.PRNGKey(2))
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9]]
    gen = ssm_llm.GenerationConfig(max_new_tokens=24, eos_token_ids=())
    plain = ssm_llm.generate(params, config, prompts, gen)
    out = ssm_llm.generate(
        params,
        config,
        prompts,
        ssm_llm.GenerationConfig(max_new_tokens=24, eos_token_ids=(), speculative=PromptLookup(num_tokens=4)),
    )
    assert out.tokens == plain.tokens
    assert all(a > 0 for a in out.speculative.accepted)  # this random model's greedy text repeats itself
