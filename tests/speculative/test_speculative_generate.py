"""generate(..., speculative=drafter): greedy output identical to plain greedy decoding for every
drafter, target family and batch shape; the sampled output's law equal to the target's (chi-square);
and clear errors for what does not combine."""

import numpy as np
import pytest
from spec_checks import LLAMA, MAMBA1, MAMBA2, RandomTreeDrafter, assert_same_greedy, ragged_prompts, wide_params

import ssm_llm
from ssm_llm.speculative import RSD, DraftModel, DySpec, TokenRecycling, self_speculative
from ssm_llm.speculative.token_recycling import UNKNOWN

TARGETS = {"llama": LLAMA, "mamba2": MAMBA2, "mamba1": MAMBA1}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request):
    config = TARGETS[request.param]
    return config, wide_params(config, seed=3)


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 3])  # batch 1: -m slow (CI time)
def test_random_trees_give_plain_greedy_output(target, batch):
    config, params = target
    prompts = ragged_prompts(np.random.default_rng(batch), config.vocab_size)[:batch]
    assert_same_greedy(params, config, prompts, RandomTreeDrafter(config.vocab_size), max_new_tokens=14)


def test_eos_stops_rows_inside_a_round(target):
    config, params = target
    prompts = ragged_prompts(np.random.default_rng(7), config.vocab_size)
    free = ssm_llm.generate(params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=()))
    eos = free.tokens[1][4]
    assert_same_greedy(
        params, config, prompts, RandomTreeDrafter(config.vocab_size), max_new_tokens=12, eos_token_ids=(eos,)
    )


def test_speculative_rejects_what_does_not_combine():
    from ssm_llm.kv import StreamingLLM

    params = wide_params(LLAMA)
    with pytest.raises(ValueError, match="drafter"):
        ssm_llm.GenerationConfig(speculative="prompt_lookup")
    with pytest.raises(ValueError, match="kv_compression"):
        ssm_llm.GenerationConfig(speculative=RandomTreeDrafter(64), kv_compression=StreamingLLM(budget=16))
    with pytest.raises(ValueError, match="on_token"):
        ssm_llm.generate(
            params,
            LLAMA,
            [[1, 2]],
            ssm_llm.GenerationConfig(speculative=RandomTreeDrafter(64)),
            on_token=lambda step, tok: None,
        )


SMALL_VOCAB = ssm_llm.ModelConfig(
    vocab_size=8,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)


def exact_law(params, config, prompt, gen_config) -> np.ndarray:
    """P(t1, t2, t3) of the target after `prompt` under gen_config's filters: [V, V, V]."""
    import jax.numpy as jnp

    v = config.vocab_size
    pairs = np.array([[a, b] for a in range(v) for b in range(v)])
    tokens = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1)
    cache = ssm_llm.init_cache(config, len(pairs), tokens.shape[1])
    logits, _ = ssm_llm.forward(params, config, jnp.asarray(tokens), cache)
    filters = dict(
        temperature=gen_config.temperature,
        top_k=gen_config.top_k,
        top_p=gen_config.top_p if gen_config.top_p < 1 else None,
    )
    probs = np.asarray(jax_softmax(ssm_llm.filter_logits(logits.reshape(-1, v), **filters))).reshape(len(pairs), -1, v)
    n = len(prompt)
    p1 = probs[0, n - 1]  # after the prompt
    p2 = probs[::v, n].reshape(v, v)  # after prompt + t1 (any t2 gives the same)
    p3 = probs[:, n + 1].reshape(v, v, v)  # after prompt + t1 + t2
    return p1[:, None, None] * p2[:, :, None] * p3


def jax_softmax(x):
    import jax

    return jax.nn.softmax(x, axis=-1)


def chi_square_p(counts: np.ndarray, law: np.ndarray) -> float:
    """Chi-square goodness of fit, cells with expected count < 5 merged into one."""
    from scipy.stats import chisquare

    expected = law.ravel() * counts.sum()
    small = expected < 5
    obs = np.append(counts.ravel()[~small], counts.ravel()[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


SAMPLES = 20_000


@pytest.mark.parametrize("draw", ["deterministic", "independent"])
@pytest.mark.parametrize("filters", [dict(temperature=1.0), dict(temperature=0.7, top_k=5)])
def test_sampling_preserves_the_target_law(draw, filters):
    """The first three tokens of 20k sampled rows (tokens 2 and 3 from speculative rounds) follow the
    target's exact law: chi-square p-value > 1e-3 (fixed seed)."""
    params = wide_params(SMALL_VOCAB, seed=1, scale=3.0)
    prompt = [1, 2, 3]
    gen_config = ssm_llm.GenerationConfig(
        max_new_tokens=3, eos_token_ids=(), seed=11, **filters, speculative=RandomTreeDrafter(8, draw=draw)
    )
    out = ssm_llm.generate(params, SMALL_VOCAB, [prompt] * SAMPLES, gen_config)
    tokens = np.asarray(out.tokens)
    counts = np.zeros((8, 8, 8))
    np.add.at(counts, (tokens[:, 0], tokens[:, 1], tokens[:, 2]), 1)
    law = exact_law(params, SMALL_VOCAB, prompt, gen_config)
    assert chi_square_p(counts, law) > 1e-3
    assert out.speculative.tokens_per_round > 1.0  # drafts were really accepted along the way


def test_prompt_lookup_rounds_without_drafts(target):
    """Prompt lookup finds no match in most rounds of random prompts: those rounds score the root alone
    (`verify.root_logits`), and the output is still plain greedy's, for every target family."""
    from ssm_llm.speculative import PromptLookup

    config, params = target
    prompts = ragged_prompts(np.random.default_rng(5), config.vocab_size) + [[3, 4, 5, 3, 4]]
    assert_same_greedy(params, config, prompts, PromptLookup(num_tokens=3), max_new_tokens=10)


def make_drafter(kind, params, config):
    """Small trees keep the compiles short (RSD: one level of 3 siblings; DySpec: two growth steps; their
    tree shapes are checked in test_spec_rsd_dyspec.py). The model drafters run the target's first layer
    (`self_speculative`): a state-space target gets a state-space draft."""
    if kind == "token_recycling":  # an explicit empty matrix: the hot start below reuses the compiled loop
        return TokenRecycling(adjacency=np.full((config.vocab_size, 8), UNKNOWN, np.int32))
    draft_params, draft_config = self_speculative(params, config, [0])
    return {
        "draft_model": lambda: DraftModel(draft_params, draft_config, num_tokens=2),
        "rsd": lambda: RSD(draft_params, draft_config, (3,)),
        "dyspec": lambda: DySpec(draft_params, draft_config, tree_size=5, max_depth=2, per_step=2),
    }[kind]()


@pytest.mark.parametrize("kind", ["token_recycling", "draft_model", "rsd", "dyspec"])
def test_every_drafter_gives_plain_greedy_output(target, kind):
    """TokenRecycling, DraftModel, RSD and DySpec x every target family (PromptLookup: the test above), on
    the ragged batch of test_random_trees_give_plain_greedy_output[3] (whose plain-greedy compile it reuses)."""
    config, params = target
    prompts = ragged_prompts(np.random.default_rng(3), config.vocab_size)
    spec = assert_same_greedy(params, config, prompts, make_drafter(kind, params, config), max_new_tokens=14)
    if kind == "token_recycling":  # hot start from the learned matrix: drafts now hit
        spec = assert_same_greedy(
            params, config, prompts, TokenRecycling(adjacency=spec.speculative.drafter_state), max_new_tokens=14
        )
    assert sum(spec.speculative.accepted) > 0  # drafts were accepted: the check is not vacuous
