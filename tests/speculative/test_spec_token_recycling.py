"""TokenRecycling: the template, drafting by lookup in the adjacency matrix, recycling the target's top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_llm.sampling import Sampling
from ssm_llm.speculative.protocol import Acceptance, DraftContext
from ssm_llm.speculative.token_recycling import DEFAULT_TEMPLATE, WIDE_TEMPLATE, TokenRecycling, bfs_template
from ssm_llm.speculative.tree import UNUSED, DraftTree, check_tree, depths

V, K = 32, 4
CONFIG = type("Config", (), {"vocab_size": V})()  # init only reads vocab_size
SAMPLING = Sampling(temperature=jnp.float32(1.0))
KEY = jax.random.PRNGKey(0)
TEMPLATE = bfs_template(((3,), (2, 1), (1, 0, 1), (1,)))  # nodes 1..3, 4..6, 7..8, 9


def context(rows, active=None, width=None):
    width = width or max(len(r) for r in rows) + 2
    history = np.full((len(rows), width), V - 1, np.int32)
    for b, row in enumerate(rows):
        history[b, : len(row)] = row
    active = np.ones(len(rows), bool) if active is None else np.asarray(active)
    return DraftContext(jnp.asarray(history), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.asarray(active))


def hand_adjacency():
    """adj[t, r] = (3 t + 5 r + 1) % V: distinct per row, known to the test."""
    t, r = np.meshgrid(np.arange(V), np.arange(K), indexing="ij")
    return (3 * t + 5 * r + 1) % V


def expected_tokens(adj, root, template):
    tokens = [root]
    for parent, rank in template:
        tokens.append(int(adj[tokens[parent], rank]))
    return tokens


def test_bfs_template_example_and_default():
    assert bfs_template(((2,), (1,))) == ((0, 0), (0, 1), (1, 0))
    assert TEMPLATE == ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (4, 0), (6, 0), (7, 0))
    drafter = TokenRecycling()
    assert drafter.template == DEFAULT_TEMPLATE == ((0, 0), (0, 1), (1, 0), (2, 0), (3, 0))
    assert drafter.tree_size == 6 and 17 <= TokenRecycling(template=WIDE_TEMPLATE).tree_size <= 25
    parents = jnp.asarray([[-1] + [p for p, _ in WIDE_TEMPLATE]], jnp.int32)
    d = np.asarray(depths(parents))[0]
    deepest = int(np.argmax(d))
    assert 4 <= d.max() <= 6
    node = deepest  # the deepest node is on the rank-0 chain from the root
    while node:
        parent, rank = WIDE_TEMPLATE[node - 1]
        assert rank == 0
        node = parent
    assert [rank for parent, rank in WIDE_TEMPLATE if parent == 0] == [0, 1, 2, 3]


def test_tree_follows_the_template():
    adj = hand_adjacency()
    drafter = TokenRecycling(candidates=K, template=TEMPLATE, adjacency=jnp.asarray(adj))
    state = drafter.init({}, CONFIG, None, None, 16, "xla")
    ctx = context([[1, 2, 7], [5], [9, 9, 9, 30]])
    tree, new_state = drafter.propose(state, ctx, SAMPLING, KEY)
    check_tree(tree, vocab_size=V)
    assert tree.size == drafter.tree_size == len(TEMPLATE) + 1 and tree.draw == "deterministic"
    assert new_state is state
    np.testing.assert_array_equal(tree.parents, np.broadcast_to([-1] + [p for p, _ in TEMPLATE], (3, tree.size)))
    for b, root in enumerate([7, 5, 30]):
        assert np.asarray(tree.tokens[b]).tolist() == expected_tokens(adj, root, TEMPLATE)


def test_unknown_entries_leave_nodes_and_their_subtrees_unused():
    adj = hand_adjacency()
    root = 7
    adj[root, 1] = -1  # node 2 (root, rank 1) unknown -> its subtree 2, 6, 8 unused
    node4 = adj[adj[root, 0], 0]
    adj[node4, 0] = -1  # node 7 (node 4, rank 0) unknown -> nodes 7 and 9 unused
    drafter = TokenRecycling(candidates=K, template=TEMPLATE, adjacency=jnp.asarray(adj))
    state = drafter.init({}, CONFIG, None, None, 16, "xla")
    tree, _ = jax.jit(lambda s, c: drafter.propose(s, c, SAMPLING, KEY))(state, context([[root]]))
    check_tree(tree, vocab_size=V)
    assert np.asarray(tree.used)[0].tolist() == [True, True, False, True, True, True, False, False, False, False]
    tokens = np.asarray(tree.tokens)[0]
    expected = expected_tokens(hand_adjacency(), root, TEMPLATE)
    for i in (0, 1, 3, 4, 5):
        assert tokens[i] == expected[i]
    # An empty matrix drafts nothing: only the root is used.
    tree, _ = drafter.propose(jnp.full((V, K), -1, jnp.int32), context([[root], [3, 4]]), SAMPLING, KEY)
    check_tree(tree)
    assert np.asarray(tree.used).sum(axis=1).tolist() == [1, 1]


def test_update_writes_the_top_k_of_every_used_node_of_active_rows():
    drafter = TokenRecycling(candidates=K, template=TEMPLATE)
    state = drafter.init({}, CONFIG, None, None, 16, "xla")
    n = drafter.tree_size
    tokens = np.arange(3 * n).reshape(3, n) % V  # distinct within rows 0 and 1
    parents = np.broadcast_to(np.asarray([-1] + [p for p, _ in TEMPLATE]), (3, n)).copy()
    parents[0, [2, 6, 8, 9]] = UNUSED  # node 2's subtree and leaf 9 unused in row 0
    tree = DraftTree(jnp.asarray(tokens, jnp.int32), jnp.asarray(parents, jnp.int32))
    check_tree(tree, vocab_size=V)
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, n, V))
    ctx = context([[1], [2], [3]], active=[True, True, False])
    acceptance = Acceptance(jnp.zeros((3, n), jnp.int32), jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32))
    adj = np.asarray(jax.jit(drafter.update)(state, ctx, tree, logits, acceptance))
    top = np.argsort(-np.asarray(logits), axis=-1)[..., :K]
    written = set()
    for b in (0, 1):
        for i in range(n):
            if parents[b, i] != UNUSED:
                np.testing.assert_array_equal(adj[tokens[b, i]], top[b, i])
                written.add(tokens[b, i])
    assert not set(tokens[0, [2, 6, 8, 9]]) & written
    for token in set(range(V)) - written:  # unused nodes and the inactive row wrote nothing
        assert (adj[token] == -1).all(), token
    assert adj.dtype == np.int32


def test_learns_a_deterministic_text_in_a_few_rounds():
    """A stand-in target that always continues t with succ(t): the first pass over the cycle learns each
    token as a root (nothing to draft yet), then the rank-0 chain drafts the text exactly."""
    drafter = TokenRecycling(candidates=K, template=TEMPLATE)
    state = drafter.init({}, CONFIG, None, None, 64, "xla")
    succ = lambda t: (t + 1) % 7  # noqa: E731 - the text cycles through 7 tokens
    propose = jax.jit(lambda s, c: drafter.propose(s, c, SAMPLING, KEY))
    update = jax.jit(drafter.update)
    text, accepted = [1], []
    for _ in range(14):
        ctx = context([text], width=64)  # one shape: one compile
        tree, state = propose(state, ctx)
        tokens, parents, used = (np.asarray(a)[0] for a in (tree.tokens, tree.parents, tree.used))
        # Logits: succ(token) first, then a fixed order: the target's top-k are known.
        logits = np.tile(np.linspace(0, -1, V), (1, tree.size, 1)).astype(np.float32)
        logits[0, np.arange(tree.size), succ(tokens)] = 5.0
        node, path = 0, []
        while True:  # greedy acceptance: the child whose token the target predicts
            nxt = [i for i in range(tree.size) if used[i] and parents[i] == node and tokens[i] == succ(tokens[node])]
            if not nxt:
                break
            node = nxt[0]
            path.append(int(tokens[node]))
        accepted.append(len(path))
        text = text + path + [succ(text[-1] if not path else path[-1])]
        acceptance = Acceptance(
            jnp.zeros((1, tree.size), jnp.int32),
            jnp.asarray([len(path)], jnp.int32),
            jnp.asarray([text[-1]], jnp.int32),
        )
        state = update(state, context([text], width=64), tree, jnp.asarray(logits), acceptance)
    assert all(text[i + 1] == succ(text[i]) for i in range(len(text) - 1))
    assert max(np.asarray(depths(tree.parents))[0]) == 4
    assert accepted == [0] * 7 + [4] * 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"candidates": 0}, r"candidates must be an int >= 1, got 0"),
        ({"template": ()}, r"template must have at least one node"),
        ({"template": ((0, 0), (2, 0))}, r"node 2 has parent 2; expected a parent in \[0, 2\)"),
        ({"template": ((0, 4),), "candidates": 4}, r"node 1 has rank 4; expected a rank in \[0, candidates=4\)"),
        ({"template": ((0, 0), (0, 0))}, r"repeats a \(parent, rank\) pair"),
        ({"template": ((0, 0, 1),)}, r"template must be a sequence of \(parent, rank\) int pairs"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenRecycling(**kwargs)


def test_template_given_as_lists_becomes_a_hashable_tuple():
    drafter = TokenRecycling(candidates=2, template=[[0, 0], [0, 1], [1, 0]])
    assert drafter.template == ((0, 0), (0, 1), (1, 0)) and hash(drafter.template)


@pytest.mark.parametrize(
    "branching, message",
    [
        (((2,), (1, 1, 1)), r"level 1 lists 3 child counts, but has only 2 nodes"),
        (((1, 1),), r"level 0 lists 2 child counts, but has only 1 nodes"),
        (((2,), (-1,)), r"child count of node 1 must be an int >= 0, got -1"),
    ],
)
def test_bad_branching(branching, message):
    with pytest.raises(ValueError, match=message):
        bfs_template(branching)


@pytest.mark.parametrize(
    "adjacency, candidates, message",
    [
        (np.zeros((V, 3), np.int32), K, r"adjacency must be an int array of shape \(32, 4\)"),
        (np.zeros((V, K), np.float32), K, r"adjacency must be an int array of shape \(32, 4\) .*got float32"),
        (None, V + 1, r"candidates \(33\) exceeds the vocabulary \(32 tokens\)"),
    ],
)
def test_bad_adjacency(adjacency, candidates, message):
    drafter = TokenRecycling(candidates=candidates, template=((0, 0),), adjacency=adjacency)
    with pytest.raises(ValueError, match=message):
        drafter.init({}, CONFIG, None, None, 16, "xla")


@pytest.mark.slow
def test_greedy_generate_with_token_recycling_matches_plain_greedy():
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
    plain = ssm_llm.generate(params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=24, eos_token_ids=()))
    out = ssm_llm.generate(
        params,
        config,
        prompts,
        ssm_llm.GenerationConfig(max_new_tokens=24, eos_token_ids=(), speculative=TokenRecycling(candidates=4)),
    )
    assert out.tokens == plain.tokens
    assert all(a > 0 for a in out.speculative.accepted)  # this random model's greedy text repeats itself
