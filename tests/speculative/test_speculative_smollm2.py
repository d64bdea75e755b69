"""Speculative decoding on the real SmolLM2-135M: every drafter's greedy output is token for token plain
greedy `generate`'s, on a ragged batch and on single prompts, and drafts are really accepted."""

import pytest
from spec_checks import assert_same_greedy

from ssm_llm import speculative
from ssm_llm.speculative.token_recycling import DEFAULT_TEMPLATE

pytestmark = pytest.mark.optimized_xla  # long runs of the real model: run time, not compiling, dominates

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press. Repeat: The history of the printing press",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n",
    "Once upon a time",
]
KEEP = tuple(range(12)) + tuple(
    range(18, 30)
)  # the self-speculative draft: 24 of the 30 layers (SmolLM2 loses most top-1 agreement with fewer)


def drafters(params, config):
    draft_params, draft_config = speculative.self_speculative(params, config, KEEP)
    return {
        "prompt_lookup": speculative.PromptLookup(),
        "token_recycling": speculative.TokenRecycling(),
        "layer_skip": speculative.DraftModel(draft_params, draft_config, num_tokens=3),
        "rsd": speculative.RSD(draft_params, draft_config, branching=(2, 2, 1)),
        "dyspec": speculative.DySpec(draft_params, draft_config, tree_size=8, max_depth=4, per_step=4),
    }


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, speculative.WIDE_TEMPLATE], ids=["default", "wide"])
def test_token_recycling_hot_start(smollm2, template):
    """Token Recycling learns its matrix while decoding; started from the matrix a first call ended with
    (the paper's hot start), a second call over the same prompts accepts more drafts and stays exact.
    Both templates: the default 5 drafts (depth 3) and the 20-draft WIDE_TEMPLATE (depth 6)."""
    config, params, tokenizer, _ = smollm2
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    cold = assert_same_greedy(
        params, config, ids, speculative.TokenRecycling(template=template), max_new_tokens=24, eos_token_ids=()
    )
    hot_drafter = speculative.TokenRecycling(template=template, adjacency=cold.speculative.drafter_state)
    hot = assert_same_greedy(params, config, ids, hot_drafter, max_new_tokens=24, eos_token_ids=())
    assert hot.speculative.tokens_per_round > max(1.5, cold.speculative.tokens_per_round), (
        cold.speculative,
        hot.speculative,
    )


@pytest.mark.parametrize(
    "name",
    [
        "prompt_lookup",
        "layer_skip",
        pytest.param("rsd", marks=pytest.mark.slow),
        pytest.param("dyspec", marks=pytest.mark.slow),
    ],
)
def test_greedy_output_is_plain_greedy(smollm2, name):
    config, params, tokenizer, _ = smollm2
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    drafter = drafters(params, config)[name]
    batch = assert_same_greedy(params, config, ids, drafter, max_new_tokens=24, eos_token_ids=())
    assert batch.speculative.tokens_per_round > 1.2, batch.speculative
    assert_same_greedy(params, config, ids[:1], drafter, max_new_tokens=24, eos_token_ids=())


@pytest.mark.slow  # CI runs RSD / DySpec on the tiny targets (test_speculative_generate.py); this adds SmolLM2
@pytest.mark.parametrize("name", ["rsd", "dyspec"])
def test_tree_drafters_briefly(smollm2, name):
    """RSD and DySpec in the default suite: 8 tokens of the ragged batch (the test above, `-m slow` for these
    two, writes 24 and adds single prompts)."""
    config, params, tokenizer, _ = smollm2
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    batch = assert_same_greedy(params, config, ids, drafters(params, config)[name], max_new_tokens=8, eos_token_ids=())
    assert batch.speculative.tokens_per_round > 1.2, batch.speculative
