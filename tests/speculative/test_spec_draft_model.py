"""DraftModel: greedy chains equal plain greedy decoding of the draft (attention and Mamba-2 drafts), the
state after `update` equals a fresh prefill of the committed tokens, sampled drafts record the draft's
law; self-speculative layer skipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_checks import assert_same_greedy
from spec_draft_checks import (
    GREEDY,
    LLAMA,
    MAMBA2,
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
    update,
)

import ssm_llm
from ssm_llm.speculative import verify
from ssm_llm.speculative.acceptance import accept_greedy
from ssm_llm.speculative.draft_model import DraftModel, self_speculative
from ssm_llm.speculative.protocol import Acceptance
from ssm_llm.speculative.tree import check_tree

DRAFTS = {"llama": LLAMA, "mamba2": MAMBA2}
K = 4


@pytest.fixture(scope="module", params=sorted(DRAFTS))
def draft(request):
    config = DRAFTS[request.param]
    params = peaked_params(config, seed=1)
    return params, config


def start(drafter, prompts=PROMPTS, roots=ROOTS):
    """The drafter's state after prefilling `prompts`, and the context whose roots are `roots`."""
    tokens, lengths = prompt_batch(prompts)
    state = drafter.init(None, LLAMA, tokens, lengths, MAX_LEN)
    return state, context([p + [r] for p, r in zip(prompts, roots, strict=True)])


def test_greedy_chain_is_plain_greedy_decoding_of_the_draft(draft):
    params, config = draft
    drafter = DraftModel(params, config, num_tokens=K)
    state, ctx = start(drafter)
    tree, _ = propose(drafter, state, ctx, GREEDY, jax.random.PRNGKey(0))
    check_tree(tree, config.vocab_size)
    assert tree.draw == "deterministic" and tree.child_probs is None
    np.testing.assert_array_equal(tree.parents, np.tile(np.arange(-1, K), (3, 1)))
    sequences = [p + [r] for p, r in zip(PROMPTS, ROOTS, strict=True)]
    for _ in range(K):
        best = path_logits(params, config, sequences).argmax(-1)
        sequences = [s + [int(t)] for s, t in zip(sequences, best, strict=True)]
    expected = [s[len(p) + 1 :] for s, p in zip(sequences, PROMPTS, strict=True)]
    np.testing.assert_array_equal(np.asarray(tree.tokens), [[r] + e for r, e in zip(ROOTS, expected, strict=True)])


def test_update_gives_the_state_of_a_fresh_prefill(draft):
    """Rows accept 2 drafts, all K (the leaf, which propose never computed) and nothing while inactive;
    the next proposal from the updated state equals one from a prefill of the committed tokens."""
    params, config = draft
    drafter = DraftModel(params, config, num_tokens=K)
    state, ctx = start(drafter)
    temp = sampled(0.8)
    tree, proposed = propose(drafter, state, ctx, temp, jax.random.PRNGKey(1))
    # The speculative loop carries the state through lax.while_loop: same structure, shapes and dtypes.
    assert jax.tree_util.tree_structure(proposed) == jax.tree_util.tree_structure(state)
    jax.tree_util.tree_map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail("state changed"), proposed, state
    )
    accepted = np.array([2, K, 1])
    active = np.array([True, True, False])
    bonus = [20, 21, 22]
    acceptance = Acceptance(
        jnp.tile(jnp.arange(K + 1, dtype=jnp.int32), (3, 1)),
        jnp.asarray(accepted, jnp.int32),
        jnp.asarray(bonus, jnp.int32),
    )
    drafts = np.asarray(tree.tokens)[:, 1:]
    committed = [
        p + [r] + drafts[b, : accepted[b]].tolist() if active[b] else list(p)
        for b, (p, r) in enumerate(zip(PROMPTS, ROOTS, strict=True))
    ]
    roots = [bonus[b] if active[b] else ROOTS[b] for b in range(3)]
    updated = update(
        drafter, proposed, context([c + [r] for c, r in zip(committed, roots, strict=True)], active), tree, acceptance
    )
    np.testing.assert_array_equal(updated.cache.lengths, [len(c) for c in committed])

    fresh, ctx_next = start(drafter, committed, roots)
    key = jax.random.PRNGKey(2)
    got, _ = propose(drafter, updated, ctx_next, temp, key)
    want, _ = propose(drafter, fresh, ctx_next, temp, key)
    np.testing.assert_allclose(got.child_probs, want.child_probs, atol=2e-5)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_sampled_drafts_record_the_draft_law():
    params = peaked_params(LLAMA, seed=1)
    drafter = DraftModel(params, LLAMA, num_tokens=K)
    state, ctx = start(drafter)
    tree, _ = propose(drafter, state, ctx, sampled(0.7), jax.random.PRNGKey(3))
    check_tree(tree, LLAMA.vocab_size)
    assert tree.draw == "independent"
    tokens, probs = np.asarray(tree.tokens), np.asarray(tree.child_probs)
    for d in range(K):
        sequences = [p + tokens[b, : d + 1].tolist() for b, p in enumerate(PROMPTS)]
        np.testing.assert_allclose(probs[:, d], draft_law(path_logits(params, LLAMA, sequences), 0.7), atol=2e-5)
    assert not probs[:, K].any()  # the leaf has no children


def test_target_as_its_own_draft_is_fully_accepted():
    params = peaked_params(LLAMA, seed=1)
    drafter = DraftModel(params, LLAMA, num_tokens=K)
    state, ctx = start(drafter)
    tree, _ = propose(drafter, state, ctx, GREEDY, jax.random.PRNGKey(0))
    tokens, lengths = prompt_batch(PROMPTS)
    _, cache = ssm_llm.forward(params, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 3, MAX_LEN), token_counts=lengths)
    logits, _ = verify.tree_logits(params, LLAMA, cache, tree)
    np.testing.assert_array_equal(accept_greedy(tree, logits).accepted, [K] * 3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["skip_layers", "target_itself", "mamba2"])
def test_generate_with_a_draft_model_equals_plain_greedy(kind):
    params = peaked_params(LLAMA, seed=2)
    drafter = {
        "skip_layers": lambda: DraftModel.skip_layers(params, LLAMA, keep=[0], num_tokens=3),
        "target_itself": lambda: DraftModel(params, LLAMA, num_tokens=3),
        "mamba2": lambda: DraftModel(peaked_params(MAMBA2, seed=1), MAMBA2, num_tokens=3),
    }[kind]()
    spec = assert_same_greedy(params, LLAMA, [[1, 2, 3], [4, 5, 6, 7, 8]], drafter, max_new_tokens=10)
    if kind == "target_itself":  # every round accepts all 3 drafts (the leaf is computed in update): 9 tokens
        assert spec.speculative.rounds == [3, 3] and spec.speculative.accepted == [9, 9]


@pytest.mark.slow
def test_sampled_target_as_its_own_draft_accepts_every_draft():
    """The recorded draft law is the target's own law, so rejection sampling accepts every draft."""
    params = peaked_params(LLAMA, seed=2)
    out = ssm_llm.generate(
        params,
        LLAMA,
        [[1, 2, 3], [4, 5, 6, 7, 8]],
        ssm_llm.GenerationConfig(
            max_new_tokens=10, temperature=0.8, eos_token_ids=(), speculative=DraftModel(params, LLAMA, num_tokens=3)
        ),
    )
    assert out.speculative.rounds == [3, 3] and out.speculative.accepted == [9, 9]


WINDOWED = dataclasses.replace(LLAMA, num_layers=3, layer_windows=(0, 5, 3))


@pytest.mark.parametrize("stacked", [True, False])
def test_keeping_every_layer_is_the_target(stacked):
    params = ssm_llm.init_params(WINDOWED, jax.random.PRNGKey(4))
    params = params if stacked else ssm_llm.unstack_layers(params)
    kept, config = self_speculative(params, WINDOWED, [0, 1, 2])
    assert config == WINDOWED
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    want, _ = ssm_llm.forward(params, WINDOWED, tokens, ssm_llm.init_cache(WINDOWED, 1, 8))
    got, _ = ssm_llm.forward(kept, config, tokens, ssm_llm.init_cache(config, 1, 8))
    np.testing.assert_array_equal(got, want)


def test_skipped_layers_slice_params_and_windows_in_both_layouts():
    params = ssm_llm.init_params(WINDOWED, jax.random.PRNGKey(4))
    kept, config = self_speculative(params, WINDOWED, [0, 2])
    assert config.num_layers == 2 and config.layer_windows == (0, 3)
    per_layer = ssm_llm.unstack_layers(params)["layers"]
    kept_list, config_list = self_speculative(ssm_llm.unstack_layers(params), WINDOWED, [0, 2])
    assert config_list == config and isinstance(kept_list["layers"], list)
    for layers in (ssm_llm.unstack_layers(kept)["layers"], kept_list["layers"]):
        assert len(layers) == 2
        for mine, source in zip(layers, (0, 2), strict=True):
            jax.tree_util.tree_map(np.testing.assert_array_equal, mine, per_layer[source])
    mamba, mamba_config = self_speculative(ssm_llm.init_params(MAMBA2, jax.random.PRNGKey(5)), MAMBA2, [1])
    assert mamba_config.num_layers == 1 and mamba["layers"]["in_proj"].shape[0] == 1


@pytest.mark.parametrize(
    "layers, message",
    [
        ([], "must not be empty"),
        ([0, 0], "sorted and unique"),
        ([2, 1], "sorted and unique"),
        ([0, 3], r"lie in \[0, 3\)"),
        ([-1, 1], r"lie in \[0, 3\)"),
        ([0.5], "must be ints"),
    ],
)
def test_bad_layer_lists(layers, message):
    params = ssm_llm.init_params(WINDOWED, jax.random.PRNGKey(4))
    with pytest.raises(ValueError, match=message):
        DraftModel.skip_layers(params, WINDOWED, keep=layers)


def test_vocabulary_mismatch_and_bad_num_tokens():
    params = ssm_llm.init_params(LLAMA, jax.random.PRNGKey(4))
    tokens, lengths = prompt_batch(PROMPTS)
    target = dataclasses.replace(LLAMA, vocab_size=65)
    with pytest.raises(ValueError, match=r"vocabulary \(64 tokens\) must be the target's \(65 tokens\)"):
        DraftModel(params, LLAMA).init(None, target, tokens, lengths, MAX_LEN)
    with pytest.raises(ValueError, match="num_tokens must be an int >= 1"):
        DraftModel(params, LLAMA, num_tokens=0)
