"""RSD-C and DySpec trees: shapes and bounds, greedy children equal to the draft's best tokens, sampled
children drawn without replacement from the draft's law (statistically), DySpec's nodes equal a numpy
best-first expansion by path probability."""

import jax
import numpy as np
import pytest
from spec_checks import assert_same_greedy
from spec_draft_checks import (
    GREEDY,
    LLAMA,
    MAX_LEN,
    PROMPTS,
    ROOTS,
    context,
    draft_law,
    path_logits,
    peaked_params,
    prompt_batch,
    propose,
    sampled,
)

import ssm_llm
from ssm_llm.speculative.draft_model import self_speculative
from ssm_llm.speculative.dyspec import DySpec, step_sizes
from ssm_llm.speculative.rsd import RSD, tree_parents
from ssm_llm.speculative.tree import check_tree, depths

VOCAB = LLAMA.vocab_size


@pytest.fixture(scope="module")
def params():
    return peaked_params(LLAMA, seed=1)


def grow(drafter, sampling, key=0, prompts=PROMPTS, roots=ROOTS):
    tokens, lengths = prompt_batch(prompts)
    state = drafter.init(None, LLAMA, tokens, lengths, MAX_LEN)
    tree, _ = propose(
        drafter,
        state,
        context([p + [r] for p, r in zip(prompts, roots, strict=True)]),
        sampling,
        jax.random.PRNGKey(key),
    )
    check_tree(tree, VOCAB)
    return np.asarray(tree.tokens), np.asarray(tree.parents), tree


def node_paths(tokens, parents):
    """Per row, every node's token path from the root's first child (the root's path is ())."""
    out = []
    for toks, pars in zip(tokens, parents, strict=True):
        paths = [()]
        for i in range(1, len(toks)):
            paths.append(paths[pars[i]] + (int(toks[i]),))
        out.append(paths)
    return out


def laws(params, paths, temperature=1.0):
    """{(row, path): draft law after the row's prompt, root and path} for the given (row, path) pairs."""
    keys = sorted(set(paths))
    logits = path_logits(params, LLAMA, [PROMPTS[b] + [ROOTS[b]] + list(p) for b, p in keys])
    return dict(zip(keys, draft_law(logits, temperature), strict=True))


def children(parents, row, node):
    return [i for i in range(len(parents[row])) if parents[row, i] == node]


def assert_law(samples, q, n):
    """Loose per-token check that `samples` (n draws) follow `q`: within 5 standard errors."""
    emp = np.bincount(samples, minlength=len(q)) / n
    np.testing.assert_array_less(np.abs(emp - q), 5 * np.sqrt(q * (1 - q) / n) + 2 / n)


# --- RSD-C -----------------------------------------------------------------------------------------------


def test_rsd_tree_shape():
    assert RSD(None, LLAMA).tree_size == 1 + 3 + 6 + 12 + 12
    expected = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(tree_parents((3, 2, 1)), expected)
    with pytest.raises(ValueError, match="non-empty tuple of ints >= 1"):
        RSD(None, LLAMA, ())
    with pytest.raises(ValueError, match="more children than the vocabulary"):
        RSD(None, LLAMA, (65,))


def test_rsd_greedy_children_are_the_draft_top_tokens(params):
    drafter = RSD(params, LLAMA, (3, 2, 1))
    tokens, parents, tree = grow(drafter, GREEDY)
    assert tree.draw == "deterministic" and tree.size == 16
    np.testing.assert_array_equal(parents, np.tile(tree_parents((3, 2, 1)), (3, 1)))
    paths = node_paths(tokens, parents)
    internal = [(b, paths[b][i]) for b in range(3) for i in range(10)]  # levels 0..2
    law = laws(params, internal)
    for b in range(3):
        for i in range(10):
            kids = children(parents, b, i)
            best = np.argsort(-law[(b, paths[b][i])], kind="stable")[: len(kids)]
            np.testing.assert_array_equal(tokens[b, kids], best)


def test_rsd_sampled_children_are_distinct_and_record_the_draft_law(params):
    drafter = RSD(params, LLAMA, (3, 2, 1))
    tokens, parents, tree = grow(drafter, sampled(0.8), key=5)
    assert tree.draw == "without_replacement"
    paths = node_paths(tokens, parents)
    internal = [(b, paths[b][i]) for b in range(3) for i in range(10)]
    law = laws(params, internal, 0.8)
    probs = np.asarray(tree.child_probs)
    for b in range(3):
        for i in range(10):
            kids = children(parents, b, i)
            assert len(set(tokens[b, kids])) == len(kids)
            np.testing.assert_allclose(probs[b, i], law[(b, paths[b][i])], atol=2e-5)
    assert not probs[:, 10:].any()  # leaves are not expanded


def test_rsd_sampled_children_follow_the_without_replacement_law(params):
    """Many identical rows: the root's first child ~ q, its second child ~ sum_s q(s) q(t) / (1 - q(s))."""
    n = 3000
    drafter = RSD(params, LLAMA, (2,))
    tokens, _, tree = grow(drafter, sampled(1.0), key=7, prompts=[PROMPTS[0]] * n, roots=[ROOTS[0]] * n)
    q = np.asarray(tree.child_probs[0, 0], np.float64)
    assert q.max() > 0.2  # a peaked law, so a wrong rule would show
    assert_law(tokens[:, 1], q, n)
    assert (tokens[:, 1] != tokens[:, 2]).all()
    second = q * ((q / (1 - q)).sum() - q / (1 - q))
    assert_law(tokens[:, 2], second, n)


# --- DySpec ----------------------------------------------------------------------------------------------


def best_first(params, row, tree_size, max_depth, per_step):
    """A numpy DySpec reference: grow per_step nodes at a time, each step the best (path prob x draft prob)
    next-ranked children of the nodes that exist before it. Returns the node paths in index order."""
    prefix = PROMPTS[row] + [ROOTS[row]]
    paths, path_prob, taken, law = [()], {(): 1.0}, {(): 0}, {}

    def compute(new):
        for p, q in zip(new, draft_law(path_logits(params, LLAMA, [prefix + list(p) for p in new])), strict=True):
            law[p] = q

    compute([()])
    sizes = step_sizes(tree_size, per_step)
    for s, count in enumerate(sizes):
        candidates = []
        for p in paths:
            if len(p) < max_depth:
                order = np.argsort(-law[p], kind="stable")
                for k in range(count):
                    tok = int(order[taken[p] + k])
                    candidates.append((-path_prob[p] * law[p][tok], p, tok))
        chosen = sorted(candidates, key=lambda c: c[0])[:count]
        new = []
        for score, p, tok in chosen:
            taken[p] += 1
            child = p + (tok,)
            paths.append(child)
            path_prob[child], taken[child] = -score, 0
            new.append(child)
        if s < len(sizes) - 1:
            compute(new)
    return paths


@pytest.mark.parametrize("per_step", [1, 4])
def test_dyspec_greedy_tree_is_the_best_first_expansion(params, per_step):
    """Node for node (hence every node's children are the first of its ranking, and depths are bounded)."""
    drafter = DySpec(params, LLAMA, tree_size=12, max_depth=2, per_step=per_step)
    tokens, parents, tree = grow(drafter, GREEDY)
    assert tree.draw == "deterministic" and tree.size == 12 and (parents != -2).all()
    assert np.asarray(depths(tree.parents)).max() == 2
    paths = node_paths(tokens, parents)
    for b in range(3):
        assert paths[b] == best_first(params, b, 12, 2, per_step)
    if per_step == 1:
        # One node at a time: the drafts are the 11 highest path probabilities within the depth bound,
        # so every untaken child of a node (above max depth) scores at most the weakest draft.
        law = laws(params, [(b, p) for b in range(3) for p in paths[b] if len(p) < 2])
        for b in range(3):
            prob = {(): 1.0}
            for p in paths[b][1:]:
                prob[p] = prob[p[:-1]] * law[(b, p[:-1])][p[-1]]
            weakest = min(prob[p] for p in paths[b][1:])
            for p in paths[b]:
                if len(p) < 2:
                    untaken = [t for t in range(VOCAB) if p + (t,) not in prob]
                    assert prob[p] * law[(b, p)][untaken].max() <= weakest + 1e-6


def test_dyspec_sampled_tree(params):
    drafter = DySpec(params, LLAMA, tree_size=12, max_depth=2, per_step=4)
    tokens, parents, tree = grow(drafter, sampled(0.8), key=9)
    assert tree.draw == "without_replacement" and (parents != -2).all()
    assert np.asarray(depths(tree.parents)).max() <= 2
    paths = node_paths(tokens, parents)
    computed = 12 - step_sizes(12, 4)[-1]
    law = laws(params, [(b, paths[b][i]) for b in range(3) for i in range(computed)], 0.8)
    probs = np.asarray(tree.child_probs)
    for b in range(3):
        for i in range(12):
            kids = children(parents, b, i)
            assert len(set(tokens[b, kids])) == len(kids)
            if i < computed:
                np.testing.assert_allclose(probs[b, i], law[(b, paths[b][i])], atol=2e-5)
    assert not probs[:, computed:].any()


def test_dyspec_sampled_first_child_follows_the_draft_law(params):
    n = 3000
    drafter = DySpec(params, LLAMA, tree_size=4, max_depth=2, per_step=2)
    tokens, parents, tree = grow(drafter, sampled(1.0), key=11, prompts=[PROMPTS[0]] * n, roots=[ROOTS[0]] * n)
    assert (parents[:, 1] == 0).all()
    assert_law(tokens[:, 1], np.asarray(tree.child_probs[0, 0], np.float64), n)


def test_dyspec_rejects_bad_options():
    with pytest.raises(ValueError, match="per_step must be an int >= 1"):
        DySpec(None, LLAMA, per_step=0)
    with pytest.raises(ValueError, match="max_depth must be an int >= 1"):
        DySpec(None, LLAMA, max_depth=0)
    with pytest.raises(ValueError, match="tree_size 66 needs at least 65 vocabulary tokens"):
        DySpec(None, LLAMA, tree_size=66)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rsd", "dyspec"])
def test_generate_with_a_tree_drafter_equals_plain_greedy(params, kind):
    draft_params, draft_config = self_speculative(params, LLAMA, [0])
    drafter = (
        RSD(draft_params, draft_config, (2, 2))
        if kind == "rsd"
        else DySpec(draft_params, draft_config, tree_size=8, max_depth=3, per_step=3)
    )
    assert_same_greedy(params, LLAMA, [[1, 2, 3], [4, 5, 6, 7, 8]], drafter, max_new_tokens=10)


@pytest.mark.slow
def test_sampled_target_as_its_own_rsd_draft_accepts_every_first_child(params):
    """The draft law is the target's, so each node's first child (a draw from it) is always accepted."""
    out = ssm_llm.generate(
        params,
        LLAMA,
        [[1, 2, 3], [4, 5, 6, 7, 8]],
        ssm_llm.GenerationConfig(
            max_new_tokens=10, temperature=0.8, eos_token_ids=(), speculative=RSD(params, LLAMA, (2, 2))
        ),
    )
    assert out.speculative.rounds == [3, 3] and out.speculative.accepted == [6, 6]
