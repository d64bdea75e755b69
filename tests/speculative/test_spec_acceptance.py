"""Acceptance rules for draft trees: greedy against a direct reference walk; sampling by the law of the
emitted tokens, which must be the target's law exactly for every way the drafts were drawn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from ssm_llm.sampling import Sampling, filter_logits
from ssm_llm.speculative.acceptance import accept_greedy, accept_sampling, target_probs
from ssm_llm.speculative.tree import UNUSED, DraftTree, chain

# ----------------------------------------------------------------------------------------------- greedy


def one_hot_logits(argmax, vocab, seed=0):
    """[B, N] argmax tokens -> [B, N, V] logits with that argmax (plus noise below the margin)."""
    noise = np.random.default_rng(seed).uniform(0, 1, (*np.shape(argmax), vocab))
    return jnp.asarray(noise + 3 * np.eye(vocab)[np.asarray(argmax)], jnp.float32)


def greedy_reference(tokens, parents, argmax):
    """One row: from the current node take the first child holding its argmax, until there is none."""
    cur, path = 0, [0]
    while True:
        nxt = next((i for i in range(cur + 1, len(tokens)) if parents[i] == cur and tokens[i] == argmax[cur]), None)
        if nxt is None:
            return path, argmax[cur]
        path.append(nxt)
        cur = nxt


def check_greedy(tokens, parents, argmax, vocab):
    tokens, parents, argmax = (np.asarray(a, np.int32) for a in (tokens, parents, argmax))
    out = jax.jit(accept_greedy)(DraftTree(jnp.asarray(tokens), jnp.asarray(parents)), one_hot_logits(argmax, vocab))
    for b in range(tokens.shape[0]):
        path, bonus = greedy_reference(tokens[b], parents[b], argmax[b])
        assert int(out.accepted[b]) == len(path) - 1, (b, path)
        assert np.asarray(out.path[b, : len(path)]).tolist() == path
        assert int(out.bonus[b]) == bonus
    return out


def test_greedy_hand_built():
    #          root  chain ----------   tree: two children of the root, node 3 (child of the rejected
    #                                    node 1) holds node 2's argmax but is not a child of node 2
    tokens = [
        [5, 1, 2, 3, 0, 0],  # chain, all accepted
        [5, 1, 2, 3, 0, 0],  # chain, first draft rejected
        [5, 4, 1, 3, 3, 2],  # tree: second sibling accepted, then its child 4
        [5, 1, 1, 2, 2, 3],
    ]  # unused nodes hold the argmax; duplicate sibling tokens
    parents = [[-1, 0, 1, 2, 3, 4], [-1, 0, 1, 2, 3, 4], [-1, 0, 0, 1, 2, 2], [-1, 0, 0, UNUSED, 1, UNUSED]]
    argmax = [[1, 2, 3, 0, 0, 0], [2, 2, 3, 0, 4, 1], [1, 0, 3, 0, 4, 0], [1, 2, 0, 0, 3, 4]]
    out = check_greedy(tokens, parents, argmax, vocab=6)
    assert out.accepted.tolist() == [5, 0, 2, 2]
    assert out.bonus.tolist() == [0, 2, 4, 3]
    assert out.path[2, :3].tolist() == [0, 2, 4]
    assert out.path[3, :3].tolist() == [0, 1, 4]  # the first of the two siblings holding token 1


def test_greedy_chain_helper_ragged_rows():
    root = jnp.array([7, 7, 7])
    drafts = jnp.array([[1, 2, 3], [1, 2, 3], [1, 4, 3]])
    used = jnp.array([[True, True, True], [True, False, True], [True, True, True]])
    argmax = [[1, 2, 3, 6], [1, 2, 3, 6], [1, 2, 3, 6]]
    out = accept_greedy(chain(root, drafts, used), one_hot_logits(argmax, 8))
    assert out.accepted.tolist() == [3, 1, 1]  # row 1 stops at its unused draft, row 2 at the wrong token
    assert out.bonus.tolist() == [6, 2, 2]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_random_trees_match_reference(seed):
    rng = np.random.default_rng(seed)
    batch, n, vocab = 16, 12, 3  # a tiny vocabulary so that matches and duplicate siblings are common
    parents = np.full((batch, n), UNUSED, np.int32)
    parents[:, 0] = -1
    for b in range(batch):
        for i in range(1, n):
            if rng.random() < 0.8:
                used = np.flatnonzero(parents[b, :i] != UNUSED)
                parents[b, i] = rng.choice(used[-3:])  # mostly deep trees
    tokens = rng.integers(0, vocab, (batch, n))
    argmax = rng.integers(0, vocab, (batch, n))
    check_greedy(tokens, parents, argmax, vocab)


def test_shape_errors():
    tree = chain(jnp.array([1]), jnp.array([[2, 3]]))
    with pytest.raises(ValueError, match="logits must be"):
        accept_greedy(tree, jnp.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="child_probs"):
        accept_sampling(
            DraftTree(tree.tokens, tree.parents, None, "independent"), jnp.ones((1, 3, 5)) / 5, jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="temperature"):
        target_probs(jnp.zeros((1, 3, 5)), Sampling.create(vocab_size=5, temperature=0.0))


# --------------------------------------------------------------------------------------------- sampling
#
# The synthetic target continues a prefix with f(prefix) = T[prefix[-2], prefix[-1]] (a random table), the
# drafter with Q[prefix[-2], prefix[-1]] != T. A tree is grown from the drafter by the draw under test and
# scored with probs[node] = f(path to node). Rounds are repeated (each round's tree rooted at the last
# emitted token) until every row has emitted L tokens; their joint law must be
# T[CONTEXT, ROOT][t1] * T[ROOT, t1][t2] * T[t1, t2][t3], checked by a chi-square test.

VOCAB, L, BATCH = 5, 3, 40_000
CONTEXT, ROOT = 0, 1
P_MIN = 1e-3  # a correct rule passes with p-value above this; the broken ones must fall below 1e-6
CHAIN = [-1, 0, 1, 2, 3]
# root with 3 children; node 1 with 2; depth 3; node 10 never used. RAGGED leaves (last siblings) are
# dropped in half of the rows, so rows have different trees.
TREE = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 5, UNUSED]
RAGGED = [3, 9]


def random_table(rng, vocab):
    """[V, V, V] next-token laws, bounded below so every (t1, t2, t3) cell is well populated."""
    return 0.5 * rng.dirichlet(np.ones(vocab), size=(vocab, vocab)) + 0.5 / vocab


def draw_children(rng, q, k, draw):
    """k child tokens per row of `q: [B, V]`, drawn as `draw` says (in sibling order)."""
    if draw == "deterministic":  # top-k of the drafter
        return np.argsort(-q, axis=-1)[:, :k]
    if draw == "without_replacement":  # Gumbel-top-k
        return np.argsort(-(np.log(q) + rng.gumbel(size=q.shape)), axis=-1)[:, :k]
    cdf = np.cumsum(q, axis=-1)
    u = rng.random((q.shape[0], k, 1)) * cdf[:, None, -1:]
    return np.minimum((u >= cdf[:, None, :]).sum(-1), q.shape[1] - 1)


def grow_tree(rng, topology, draw, target, drafter, prev, last):
    """A tree rooted at `last: [B]` (after `prev: [B]`), and the target's probs at its nodes [B, N, V]."""
    batch, n = prev.shape[0], len(topology)
    tokens = np.zeros((batch, n), np.int64)
    before = np.zeros((batch, n), np.int64)  # the token before each node (its parent's token)
    tokens[:, 0], before[:, 0] = last, prev
    for c in range(n):
        children = [i for i in range(n) if topology[i] == c]
        if children:
            drawn = draw_children(rng, drafter[before[:, c], tokens[:, c]], len(children), draw)
            tokens[:, children] = drawn
            before[:, children] = tokens[:, c : c + 1]
    parents = np.tile(np.asarray(topology, np.int32), (batch, 1))
    if topology == TREE:
        parents[batch // 2 :, RAGGED] = UNUSED
    child_probs = None if draw == "deterministic" else jnp.asarray(drafter[before, tokens], jnp.float32)
    tree = DraftTree(jnp.asarray(tokens, jnp.int32), jnp.asarray(parents), child_probs, draw)
    return tree, jnp.asarray(target[before, tokens], jnp.float32)


def emitted_tokens(topology, draw, target, drafter, seed, relabel=None):
    """[BATCH, L] tokens emitted by successive rounds. `relabel(tree, probs) -> tree` misdescribes the
    drafts to the acceptance rule (the power checks)."""
    rng = np.random.default_rng(seed)
    accept = jax.jit(accept_sampling)
    rows = np.arange(BATCH)
    history = np.zeros((BATCH, 2 + L + len(topology)), np.int64)
    history[:, :2] = CONTEXT, ROOT
    count = np.zeros(BATCH, np.int64)
    for rnd in range(L):
        if (count >= L).all():
            break
        tree, probs = grow_tree(rng, topology, draw, target, drafter, history[rows, count], history[rows, count + 1])
        if relabel is not None:
            tree = relabel(tree, probs)
        out = accept(tree, probs, jax.random.PRNGKey(1000 * seed + rnd))
        path, accepted, bonus = (np.asarray(a) for a in (out.path, out.accepted, out.bonus))
        parents, tokens = np.asarray(tree.parents), np.asarray(tree.tokens)
        for b in np.flatnonzero(accepted > 0)[:200]:  # the path goes down the tree, one used child at a time
            assert (parents[b, path[b, 1 : accepted[b] + 1]] == path[b, : accepted[b]]).all()
        emitted = np.concatenate([np.take_along_axis(tokens, path, axis=1)[:, 1:], np.zeros((BATCH, 1), np.int64)], 1)
        emitted[rows, accepted] = bonus
        for k in range(emitted.shape[1]):
            write = (k <= accepted) & (count < L)
            history[rows[write], 2 + count[write] + k] = emitted[write, k]
        count = np.where(count < L, count + accepted + 1, count)
    return history[:, 2 : 2 + L]


def law_pvalue(samples, target):
    """Chi-square p-value of the empirical law of `samples: [M, 3]` against the target's exact law;
    asserts that impossible triples never occur."""
    exact = target[CONTEXT, ROOT][:, None, None] * target[ROOT][:, :, None] * target
    counts = np.bincount(np.ravel_multi_index(samples.T, exact.shape), minlength=exact.size)
    exact = exact.ravel() / exact.sum()
    possible = exact > 0
    assert counts[~possible].sum() == 0, "a token the target excludes was emitted"
    return chisquare(counts[possible], exact[possible] * counts.sum()).pvalue


def tables(seed):
    rng = np.random.default_rng(seed)
    return random_table(rng, VOCAB), random_table(rng, VOCAB)


@pytest.mark.parametrize(
    "topology, draw",
    [
        (CHAIN, "deterministic"),
        (CHAIN, "independent"),
        (TREE, "independent"),
        (TREE, "without_replacement"),
        (TREE, "deterministic"),
    ],
)
def test_sampling_emits_the_target_law(topology, draw):
    target, drafter = tables(1)
    assert law_pvalue(emitted_tokens(topology, draw, target, drafter, seed=2), target) > P_MIN


@pytest.mark.parametrize("draw", ["independent", "without_replacement", "deterministic"])
def test_sampling_exact_for_filtered_target(draw):
    """A top-k filtered target (zeros in p where the drafter has mass): still exact, excluded tokens never emitted."""
    target, drafter = tables(3)
    top_3 = Sampling.create(vocab_size=VOCAB, temperature=0.8, top_k=3)
    target = np.asarray(target_probs(jnp.log(jnp.asarray(target)), top_3), np.float64)
    assert (target == 0).any()
    assert law_pvalue(emitted_tokens(TREE, draw, target, drafter, seed=4), target) > P_MIN


@pytest.mark.parametrize(
    "draw, relabel",
    [
        # the tree claims its drafts came from the target itself: every draft with p(x) > 0 is accepted
        ("independent", lambda tree, probs: DraftTree(tree.tokens, tree.parents, probs, tree.draw)),
        # Gumbel-top-k siblings taken for independent draws: later siblings' q_j and residuals are wrong
        (
            "without_replacement",
            lambda tree, probs: DraftTree(tree.tokens, tree.parents, tree.child_probs, "independent"),
        ),
    ],
    ids=["q_claimed_equal_p", "without_replacement_labelled_independent"],
)
def test_the_law_test_rejects_broken_rules(draw, relabel):
    """(Labelling sampled drafts "deterministic" would NOT be broken: the deterministic rule is exact for
    drafts of any law drawn independently of the acceptance key, only less often accepted.)"""
    target, drafter = tables(1)
    assert law_pvalue(emitted_tokens(TREE, draw, target, drafter, seed=2, relabel=relabel), target) < 1e-6


def test_duplicate_deterministic_sibling_never_accepted():
    batch = 20_000
    p = np.array([0.3, 0.5, 0.2, 0.0, 0.0])
    tree = DraftTree(
        jnp.tile(jnp.array([[4, 0, 0, 1]], jnp.int32), (batch, 1)),
        jnp.tile(jnp.array([[-1, 0, 0, 0]], jnp.int32), (batch, 1)),
    )
    out = jax.jit(accept_sampling)(tree, jnp.tile(jnp.asarray(p, jnp.float32), (batch, 4, 1)), jax.random.PRNGKey(0))
    first = np.asarray(out.path[:, 1])
    accepted = np.asarray(out.accepted)
    assert not ((accepted == 1) & (first == 2)).any()
    token = np.where(accepted == 1, np.asarray(tree.tokens)[0][first], np.asarray(out.bonus))
    counts = np.bincount(token, minlength=5)
    assert counts[3:].sum() == 0
    assert chisquare(counts[:3], p[:3] * batch).pvalue > P_MIN
    # node 3 (token 1) is tried only after node 1 was rejected; then p(1) = 0.5 / 0.7
    assert abs(np.mean((accepted == 1) & (first == 3)) - 0.7 * 0.5 / 0.7) < 0.015


def test_q_equal_p_accepts_all_without_nan():
    """p == q: every draft is accepted (min(1, p/q) = 1) and the bonus is a valid token."""
    rng = np.random.default_rng(0)
    batch, k = 64, 4
    probs = jnp.asarray(rng.dirichlet(np.ones(VOCAB), size=(batch, k + 1)), jnp.float32)
    drafts = jnp.asarray(rng.integers(0, VOCAB, (batch, k)), jnp.int32)
    tree = chain(jnp.zeros(batch, jnp.int32), drafts, child_probs=probs, draw="without_replacement")
    out = jax.jit(accept_sampling)(tree, probs, jax.random.PRNGKey(1))
    assert out.accepted.tolist() == [k] * batch
    assert ((out.bonus >= 0) & (out.bonus < VOCAB)).all()


def test_target_probs_matches_filter_logits():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 50)) * 3
    for kwargs in [dict(temperature=0.7), dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05)]:
        got = jax.jit(target_probs)(logits, Sampling.create(vocab_size=50, **kwargs))  # the numbers traced
        want = jax.vmap(lambda row, kw=kwargs: jax.nn.softmax(filter_logits(row, **kw)))(logits)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
        assert (got == 0).any() == ("top_k" in kwargs)
